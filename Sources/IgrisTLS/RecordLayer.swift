import COpenSSL
import Glibc

/// A TLS 1.3 connection's records after its handshake, without OpenSSL's `SSL` object: the
/// two directions' AEAD state (`records.c`), the ciphertext fed and not yet opened, and the
/// records sealed and not yet taken. What an idle connection keeps is the two cipher
/// contexts, about 2 KiB, where the `SSL` object it replaces holds about 15 KiB.
///
/// Handled after the handshake, as RFC 8446 asks: application data; close_notify (the peer's
/// end of writing) and other alerts; KeyUpdate (answered when requested); NewSessionTicket
/// (ignored: only a client gets them, and a resumption would need the `SSL`). Anything else,
/// a record that does not authenticate or an oversized one is fatal: an alert goes out and
/// the connection fails, as with OpenSSL.
final class RecordLayer {
    private let records: OpaquePointer
    private var input = ByteQueue()
    private var output = ByteQueue()
    /// Plaintext of a record opened into it because the reader had less room than its body.
    private var plaintext = ByteQueue()
    private var sentClose = false
    private var receivedClose = false
    private var failure: TLSFailure?

    init(records: OpaquePointer) { self.records = records }

    deinit {
        igris_records_free(records)
        input.free()
        output.free()
        plaintext.free()
    }

    func feed(_ bytes: UnsafeRawPointer, count: Int) { input.append(bytes, count) }

    var bufferedCiphertext: Int { input.count }
    var hasBufferedInput: Bool { input.count > 0 || plaintext.count > 0 }
    var pendingOutput: Int { output.count }

    /// Opens the whole records fed so far into `buffer`, up to `capacity` bytes.
    func read(into buffer: UnsafeMutableRawPointer, capacity: Int) -> TLSSession.ReadResult {
        if let failure { return .failed(failure) }
        var total = plaintext.take(into: buffer, capacity: capacity)
        while total < capacity, input.count >= 5 {
            let record = input.start
            let length = Int(record[3]) << 8 | Int(record[4])
            if record[0] != 23 { return fail(TLSFailure(.malformed, "record type \(record[0]) after the handshake"), alert: 10) }
            if length > Int(IGRIS_RECORD_CIPHERTEXT) { return fail(TLSFailure(.malformed, "record of \(length) bytes (record_overflow)"), alert: 22) }
            guard input.count >= 5 + length else { break }
            // The body (content, type, padding) is at most length - 16 bytes: into the reader's
            // buffer when it has room for that, else held here and handed out next.
            let direct = capacity - total >= length - 16
            let out = direct ? buffer + total : plaintext.reserve(length)
            var type: Int32 = 0
            let n = igris_records_open(records, record, 5 + length, out.assumingMemoryBound(to: UInt8.self), &type)
            input.drop(5 + length)
            if n == -1 { return fail(TLSFailure(.badRecord, "a record did not authenticate (bad_record_mac)"), alert: 20) }
            if n < 0 { return fail(TLSFailure(.malformed, "a record without content type"), alert: 10) }
            switch type {
            case 23:
                if direct {
                    total += n
                } else {
                    plaintext.commit(n)
                    total += plaintext.take(into: buffer + total, capacity: capacity - total)
                }
            case 21:
                let body = UnsafeRawBufferPointer(start: out, count: n)
                guard n == 2 else { return fail(TLSFailure(.malformed, "an alert of \(n) bytes"), alert: 50) }
                if body[1] == 0 {  // close_notify
                    receivedClose = true
                    return total > 0 ? .bytes(total) : .closed
                }
                failure = TLSFailure(.peerAlert, "the peer sent alert \(body[1])")
                return .failed(failure!)
            case 22:
                if let failed = handshakeMessages(UnsafeRawBufferPointer(start: out, count: n)) { return failed }
            default:
                return fail(TLSFailure(.malformed, "content type \(type) after the handshake"), alert: 10)
            }
        }
        if total > 0 { return .bytes(total) }
        return receivedClose ? .closed : .wantInput
    }

    /// Post-handshake messages, each whole in its record: nil, or the failure.
    private func handshakeMessages(_ body: UnsafeRawBufferPointer) -> TLSSession.ReadResult? {
        var i = 0
        while i < body.count {
            guard body.count - i >= 4 else { return fail(TLSFailure(.malformed, "a handshake message split across records"), alert: 10) }
            let type = body[i]
            let length = Int(body[i + 1]) << 16 | Int(body[i + 2]) << 8 | Int(body[i + 3])
            guard body.count - i - 4 >= length else { return fail(TLSFailure(.malformed, "a handshake message split across records"), alert: 10) }
            switch type {
            case 24:  // KeyUpdate
                guard length == 1, body[i + 4] <= 1 else { return fail(TLSFailure(.malformed, "a malformed KeyUpdate"), alert: 50) }
                guard igris_records_update(records, 0) == 0 else { return fail(TLSFailure(.malformed, "KeyUpdate failed"), alert: 80) }
                if body[i + 4] == 1 && !sentClose {
                    // update_requested: ours goes out under the old key, then the key changes.
                    var message: [UInt8] = [24, 0, 0, 1, 0]
                    guard seal(type: 22, &message, count: 5), igris_records_update(records, 1) == 0 else {
                        return fail(TLSFailure(.malformed, "KeyUpdate failed"), alert: 80)
                    }
                }
            case 4:  // NewSessionTicket: not kept
                break
            default:
                return fail(TLSFailure(.malformed, "handshake message \(type) after the handshake"), alert: 10)
            }
            i += 4 + length
        }
        return nil
    }

    /// A fatal error: its alert goes out (once), and every later read or write fails.
    private func fail(_ f: TLSFailure, alert: UInt8) -> TLSSession.ReadResult {
        if failure == nil && !sentClose {
            var body: [UInt8] = [2, alert]
            _ = seal(type: 21, &body, count: 2)
        }
        failure = f
        return .failed(f)
    }

    func write(_ bytes: UnsafeRawPointer, count: Int) -> Bool {
        guard failure == nil, !sentClose else { return false }
        var offset = 0
        while offset < count {
            let chunk = min(count - offset, Int(IGRIS_RECORD_PLAINTEXT))
            guard seal(type: 23, bytes + offset, count: chunk) else { return false }
            offset += chunk
        }
        return true
    }

    private func seal(type: Int32, _ bytes: UnsafeRawPointer, count: Int) -> Bool {
        let out = output.reserve(count + 22)
        let n = igris_records_seal(records, type, bytes.assumingMemoryBound(to: UInt8.self), count, out.assumingMemoryBound(to: UInt8.self))
        guard n > 0 else { return false }
        output.commit(n)
        return true
    }

    /// close_notify, once.
    func shutdown() {
        guard !sentClose, failure == nil else { return }
        var body: [UInt8] = [1, 0]
        _ = seal(type: 21, &body, count: 2)
        sentClose = true
    }

    func takeOutput(into buffer: UnsafeMutableRawPointer, capacity: Int) -> Int { output.take(into: buffer, capacity: capacity) }

    func withPendingOutput<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        body(UnsafeRawBufferPointer(start: output.count > 0 ? UnsafeRawPointer(output.start) : nil, count: output.count))
    }

    func discardOutput(_ count: Int) { output.drop(min(count, output.count)) }

    /// Gives back the buffers that are drained: an idle connection holds none.
    func releaseMemory() {
        if input.count == 0 { input.free() }
        if output.count == 0 { output.free() }
        if plaintext.count == 0 { plaintext.free() }
    }
}

/// Bytes appended at the end and taken from the front, in one malloc'd region that grows as
/// needed and is freed when asked while empty.
struct ByteQueue {
    private var base: UnsafeMutableRawPointer? = nil
    private var capacity = 0
    private var head = 0
    private var tail = 0

    var count: Int { tail - head }
    var start: UnsafeMutablePointer<UInt8> { (base! + head).assumingMemoryBound(to: UInt8.self) }

    /// Room for `count` more bytes at the end: where to write them (then `commit`).
    mutating func reserve(_ count: Int) -> UnsafeMutableRawPointer {
        if head == tail { head = 0; tail = 0 }
        if capacity - tail < count {
            if head > 0 {
                // Move what is left to the front before growing.
                if tail > head { memmove(base!, base! + head, tail - head) }
                tail -= head
                head = 0
            }
            if capacity - tail < count {
                let grown = max(capacity * 2, tail + count, 4096)
                guard let p = realloc(base, grown) else { fatalError("out of memory for TLS records") }
                base = p
                capacity = grown
            }
        }
        return base! + tail
    }

    mutating func commit(_ count: Int) { tail += count }

    mutating func append(_ bytes: UnsafeRawPointer, _ count: Int) {
        guard count > 0 else { return }
        reserve(count).copyMemory(from: bytes, byteCount: count)
        tail += count
    }

    mutating func drop(_ count: Int) {
        head += count
        if head == tail { head = 0; tail = 0 }
    }

    mutating func take(into buffer: UnsafeMutableRawPointer, capacity most: Int) -> Int {
        let n = min(most, count)
        guard n > 0 else { return 0 }
        buffer.copyMemory(from: base! + head, byteCount: n)
        drop(n)
        return n
    }

    mutating func free() {
        guard count == 0, base != nil else { return }
        Glibc.free(base)
        base = nil
        capacity = 0
        head = 0
        tail = 0
    }
}

/// Where records begin and end in a stream of ciphertext fed in pieces of any size.
struct RecordBoundary {
    /// Header bytes of the current record seen so far (0: between records or in a body).
    private var headerSeen = 0
    private var length = 0
    /// Body bytes of the current record still to come.
    private var remaining = 0

    var atBoundary: Bool { headerSeen == 0 && remaining == 0 }

    /// Follows `count` more bytes: how many records begin in them.
    mutating func consume(_ bytes: UnsafeRawPointer, _ count: Int) -> Int {
        let b = bytes.assumingMemoryBound(to: UInt8.self)
        var i = 0
        var started = 0
        while i < count {
            if remaining > 0 {
                let k = min(remaining, count - i)
                remaining -= k
                i += k
                continue
            }
            if headerSeen == 0 { started += 1 }
            if headerSeen == 3 { length = Int(b[i]) << 8 }
            if headerSeen == 4 { length |= Int(b[i]) }
            headerSeen += 1
            i += 1
            if headerSeen == 5 {
                headerSeen = 0
                remaining = length
            }
        }
        return started
    }
}
