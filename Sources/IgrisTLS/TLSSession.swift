import COpenSSL

/// One connection's TLS state, driven entirely through memory: ciphertext the engine received
/// is `feed`, plaintext comes out of `read`, plaintext to protect goes into `write`, and the
/// records to send come out of `takeOutput`. No socket, no thread, nothing blocks: the worker
/// moves every byte with its own recv and send, the same way for both backends.
///
/// Memory: OpenSSL's record buffers are released while the connection is idle
/// (SSL_MODE_RELEASE_BUFFERS), and `releaseMemory` — called when traffic pauses, after the
/// handshake and by the engine when a direction reads less than it could — replaces a
/// drained memory BIO that grew past `trimThreshold` (a drained memory BIO keeps its peak
/// allocation; replacing it while bulk flows would only regrow and re-zero it each time), so
/// an idle TLS connection holds only its `SSL` object.
public final class TLSSession {
    /// OpenSSL's state, until `protectRecordsItself` replaces it with `layer`.
    private var handle: OpaquePointer?
    var ssl: OpaquePointer { handle! }
    /// After the handshake (TLS 1.3): the records without the `SSL` object.
    private var layer: RecordLayer?
    /// Records under the application keys, counted from `startCountingRecords` on, so the
    /// records can leave OpenSSL after a negotiation too (nil: not counted, or the count was
    /// lost); `inputRecords` follows the record boundaries of what is fed.
    private var counted: (sent: Int, received: Int)?
    private var inputRecords = RecordBoundary()
    /// A client session read application data since counting began: no ticket is coming.
    private var readSinceCounting = false
    /// What was negotiated, kept when the `SSL` object goes.
    private var negotiated: (version: String, cipher: String, resumed: Bool, serverName: String?, alpn: String?)?
    private(set) var inputBIO: OpaquePointer
    private var outputBIO: OpaquePointer
    public let isServer: Bool
    /// The context object the session was made from: kept alive (its SNI callback and
    /// contexts) for as long as the session, across reloads.
    private let owner: AnyObject
    /// Plaintext read during the negotiation phase and not yet consumed (SOCKS5 / HTTP heads).
    public var negotiationBytes: [UInt8] = []
    /// Input is read where the caller received it (`useInPlaceInput`), not from a memory BIO.
    public private(set) var inPlace = false
    /// Bytes fed since the last trim, to tell when the input BIO may have grown.
    private var fedSinceTrim = 0
    /// Bytes of records taken since the last trim, likewise for the output BIO.
    private var takenSinceTrim = 0
    public static let trimThreshold = 4 * 1024

    init?(context: OpaquePointer, server: Bool, owner: AnyObject) {
        guard let ssl = SSL_new(context) else { return nil }
        guard let input = BIO_new(BIO_s_mem()), let output = BIO_new(BIO_s_mem()) else {
            SSL_free(ssl)
            return nil
        }
        // An empty memory BIO reports "retry", not EOF: more bytes may come.
        BIO_ctrl(input, BIO_C_SET_BUF_MEM_EOF_RETURN, -1, nil)
        BIO_ctrl(output, BIO_C_SET_BUF_MEM_EOF_RETURN, -1, nil)
        SSL_set_bio(ssl, input, output)
        if server { SSL_set_accept_state(ssl) } else { SSL_set_connect_state(ssl) }
        handle = ssl
        inputBIO = input
        outputBIO = output
        isServer = server
        self.owner = owner
    }

    deinit { if let handle { SSL_free(handle) } }  // frees both BIOs

    /// Replaces OpenSSL's `SSL` object (about 15 KiB) with the records' own state (about 2
    /// KiB), right after a TLS 1.3 handshake whose traffic secrets were captured: `sent`
    /// records have gone out under our key (tickets), `received` came in under the peer's.
    /// Only with nothing left inside OpenSSL (no output pending, no input unread). False when
    /// that, the version or the cipher suite does not allow it: OpenSSL carries on.
    public func protectRecordsItself(sent: Int, received: Int) -> Bool {
        guard layer == nil, let handle, pendingOutput == 0, holdsNoInput else { return false }
        guard let records = igris_records_new(handle, UInt64(sent), UInt64(received)) else {
            counted = nil  // not TLS 1.3, no secrets or another suite: no later moment will do
            return false
        }
        negotiated = (version, cipher, resumed, serverName, alpn)
        SSL_free(handle)
        self.handle = nil
        layer = RecordLayer(records: records)
        inPlace = false
        return true
    }

    /// The records are carried without OpenSSL (`protectRecordsItself`).
    public var protectsRecordsItself: Bool { layer != nil }

    /// From the handshake's end on, counts the records each way under the application keys:
    /// `sent` already (the tickets), and those in the input now, which begins on a record
    /// boundary (OpenSSL reads whole records, up to the client's Finished).
    public func startCountingRecords(sent: Int) {
        guard layer == nil, !inPlace, SSL_version(ssl) == TLS1_3_VERSION else { return }
        inputRecords = RecordBoundary()
        var data: UnsafeMutablePointer<CChar>? = nil
        let n = igris_bio_mem_data(inputBIO, &data)
        let received = n > 0 && data != nil ? inputRecords.consume(UnsafeRawPointer(data!), n) : 0
        counted = (sent, received)
    }

    /// Leaves OpenSSL (`protectRecordsItself`) from the counted records, if the moment allows:
    /// nothing pending either way and the input on a record boundary. True when it left now
    /// (false when it had already, or was not counting). A client waits for the server's
    /// session ticket first (it resumes later connections), or for application data, which
    /// says none is coming.
    public func protectRecordsWhenAligned() -> Bool {
        guard layer == nil, let counts = countedRecords else { return false }
        if !isServer && !readSinceCounting && igris_ssl_has_ticket(ssl) == 0 { return false }
        return protectRecordsItself(sent: counts.sent, received: counts.received)
    }

    /// The records sent and received since the handshake, when they were counted and the
    /// input ends on a record boundary.
    public var countedRecords: (sent: Int, received: Int)? { inputRecords.atBoundary ? counted : nil }

    /// Counts the whole records OpenSSL put in the output from byte `offset` on.
    private func countSent(from offset: Int) {
        guard counted != nil else { return }
        guard let n = pendingRecords(from: offset) else { counted = nil; return }
        counted!.sent += n
    }

    // MARK: - Ciphertext in

    /// Ciphertext received from the peer: copied into the input BIO, or (in place) read from
    /// where it is during the next `read`, which must come before the memory is reused.
    public func feed(_ bytes: UnsafeRawPointer, count: Int) {
        guard count > 0 else { return }
        if let layer { layer.feed(bytes, count: count); return }
        if counted != nil { counted!.received += inputRecords.consume(bytes, count) }
        if inPlace {
            igris_input_bio_set(inputBIO, bytes, count)
            return
        }
        _ = BIO_write(inputBIO, bytes, Int32(count))
        fedSinceTrim += count
    }

    /// From now on `feed` hands OpenSSL the caller's memory instead of copying it, and `read`
    /// may decrypt into that same memory. Safe because OpenSSL reads ahead: with a record
    /// buffer of `readBufferLength` (at least the most fed at once plus a whole record) its
    /// first read takes everything fed before any plaintext is written, which `read` checks.
    /// Only while nothing is buffered inside (else false, and input stays copied).
    public func useInPlaceInput(readBufferLength: Int) -> Bool {
        // SSL_free_buffers: the record buffer must be allocated anew at the larger size.
        guard layer == nil, !inPlace, BIO_ctrl_pending(inputBIO) == 0, SSL_has_pending(ssl) == 0, SSL_free_buffers(ssl) == 1,
              let bio = igris_input_bio_new() else { return false }
        SSL_set_read_ahead(ssl, 1)
        SSL_set_default_read_buffer_len(ssl, readBufferLength)
        SSL_set0_rbio(ssl, bio)  // frees the memory BIO
        inputBIO = bio
        inPlace = true
        fedSinceTrim = 0
        return true
    }

    /// Ciphertext fed and not yet taken by OpenSSL.
    public var bufferedCiphertext: Int { layer?.bufferedCiphertext ?? Int(BIO_ctrl_pending(inputBIO)) }

    /// Input is waiting: ciphertext not yet processed, or plaintext of a record already
    /// decrypted. `read` must be called before waiting for more from the socket.
    public var hasBufferedInput: Bool {
        if let layer { return layer.hasBufferedInput }
        return BIO_ctrl_pending(inputBIO) > 0 || SSL_pending(ssl) > 0
    }

    // MARK: - Handshake

    public enum HandshakeStep: Equatable {
        case done
        /// Needs more bytes from the peer (after sending `takeOutput`'s).
        case wantInput
        case failed(TLSFailure)
    }

    public func handshake() -> HandshakeStep {
        if layer != nil { return .done }
        ERR_clear_error()
        let rc = igris_ssl_do_handshake(ssl)
        if rc == 1 { return .done }
        let error = SSL_get_error(ssl, rc)
        if error == SSL_ERROR_WANT_READ { return .wantInput }
        return .failed(TLSFailure.current(ssl: ssl, error: error))
    }

    public var handshakeDone: Bool { layer != nil || SSL_is_init_finished(ssl) == 1 }

    // MARK: - Plaintext out

    public enum ReadResult: Equatable {
        /// Plaintext bytes written to the buffer (at least one).
        case bytes(Int)
        /// Everything fed has been read; more must come from the peer.
        case wantInput
        /// The peer sent close_notify: its direction is at its end.
        case closed
        case failed(TLSFailure)
    }

    /// Decrypts into `buffer` until it is full or the input runs out.
    /// In place (`useInPlaceInput`), `spare` (16 KiB at least: one record's plaintext) takes
    /// the plaintext of a record the session already holds part of: completing it reads just
    /// that record's rest, so the input behind it is still unread, and its plaintext must not
    /// land on it. The next read takes all the rest (read-ahead) before writing anything.
    public func read(into buffer: UnsafeMutableRawPointer, capacity: Int,
                     spare: UnsafeMutableRawPointer? = nil, spareCapacity: Int = 0) -> ReadResult {
        if let layer { return layer.read(into: buffer, capacity: capacity) }
        // A read may answer (a KeyUpdate, an alert): those records count too.
        let queued = counted != nil ? pendingOutput : 0
        defer { countSent(from: queued) }
        var total = 0
        let fed = inPlace ? igris_input_bio_left(inputBIO) : 0
        // In place, bytes written up to `end` of the buffer must not reach input not yet taken.
        func overtakesInput(_ end: Int) -> Bool {
            let left = igris_input_bio_left(inputBIO)
            return left > 0 && end > fed - left
        }
        // Once per call: a successful SSL_read_ex leaves the queue empty.
        ERR_clear_error()
        var parked = 0
        if inPlace, fed > 0, SSL_has_pending(ssl) == 1, let spare {
            var n = 0
            let rc = SSL_read_ex(ssl, spare, min(spareCapacity, capacity), &n)
            if rc == 1 {
                parked = n
                total = n
            } else {
                let error = SSL_get_error(ssl, rc)
                switch error {
                case SSL_ERROR_WANT_READ: return .wantInput
                case SSL_ERROR_ZERO_RETURN: return .closed
                default: return .failed(TLSFailure.current(ssl: ssl, error: error))
                }
            }
        }
        while total < capacity {
            var n = 0
            let rc = SSL_read_ex(ssl, buffer + total, capacity - total, &n)
            if rc == 1 {
                total += n
                if counted != nil { readSinceCounting = true }
                if inPlace && overtakesInput(total) {
                    return .failed(TLSFailure(.malformed, "input not taken whole before decrypting in place (\(igris_input_bio_left(inputBIO)) bytes left)"))
                }
                continue
            }
            let error = SSL_get_error(ssl, rc)
            if total > 0 && (error == SSL_ERROR_WANT_READ || error == SSL_ERROR_ZERO_RETURN) { break }
            switch error {
            case SSL_ERROR_WANT_READ:
                return .wantInput
            case SSL_ERROR_ZERO_RETURN: return .closed
            default: return total > 0 ? .bytes(total) : .failed(TLSFailure.current(ssl: ssl, error: error))
            }
        }
        // The parked record goes first; the input it sat on has all been taken by now.
        if parked > 0 {
            if overtakesInput(parked) {
                return .failed(TLSFailure(.malformed, "input not taken whole before decrypting in place"))
            }
            buffer.copyMemory(from: spare!, byteCount: parked)
        }
        return .bytes(total)
    }

    // MARK: - Plaintext in, records out

    /// Protects `count` bytes; their records wait in the output (`takeOutput`). False when
    /// the connection is no longer writable (after a fatal error or a shutdown).
    public func write(_ bytes: UnsafeRawPointer, count: Int) -> Bool {
        guard count > 0 else { return true }
        if let layer { return layer.write(bytes, count: count) }
        ERR_clear_error()
        var written = 0
        let queued = counted != nil ? pendingOutput : 0
        defer { countSent(from: queued) }
        return SSL_write_ex(ssl, bytes, count, &written) == 1 && written == count
    }

    /// Records waiting to be sent to the peer.
    public var pendingOutput: Int { layer?.pendingOutput ?? Int(BIO_ctrl_pending(outputBIO)) }

    /// Moves up to `capacity` bytes of pending records into `buffer`.
    public func takeOutput(into buffer: UnsafeMutableRawPointer, capacity: Int) -> Int {
        if let layer { return layer.takeOutput(into: buffer, capacity: capacity) }
        let n = max(0, Int(BIO_read(outputBIO, buffer, Int32(min(capacity, Int(Int32.max))))))
        takenSinceTrim += n
        return n
    }

    /// The pending records in place (for a direct send), then `discardOutput` what was sent.
    public func withPendingOutput<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R {
        if let layer { return layer.withPendingOutput(body) }
        var data: UnsafeMutablePointer<CChar>? = nil
        let n = igris_bio_mem_data(outputBIO, &data)
        return body(UnsafeRawBufferPointer(start: data.map { UnsafeRawPointer($0) }, count: n > 0 ? n : 0))
    }

    public func discardOutput(_ count: Int, scratch: UnsafeMutableRawPointer, scratchSize: Int) {
        if let layer { layer.discardOutput(count); return }
        var left = count
        while left > 0 {
            let n = BIO_read(outputBIO, scratch, Int32(min(left, scratchSize)))
            if n <= 0 { break }
            left -= Int(n)
            takenSinceTrim += Int(n)
        }
    }

    /// Queues close_notify (once): the end of this side's writing.
    public func shutdown() {
        if let layer { layer.shutdown(); return }
        guard SSL_get_shutdown(ssl) & SSL_SENT_SHUTDOWN == 0, handshakeDone else { return }
        let queued = counted != nil ? pendingOutput : 0
        defer { countSent(from: queued) }
        ERR_clear_error()
        _ = SSL_shutdown(ssl)
    }

    // MARK: - What was negotiated

    public var version: String { negotiated?.version ?? String(cString: SSL_get_version(ssl)) }
    public var cipher: String { negotiated?.cipher ?? SSL_CIPHER_get_name(SSL_get_current_cipher(ssl)).map { String(cString: $0) } ?? "-" }
    public var resumed: Bool { negotiated?.resumed ?? (SSL_session_reused(ssl) == 1) }
    public var serverName: String? {
        if let negotiated { return negotiated.serverName }
        return SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name).map { String(cString: $0) }
    }
    public var alpn: String? {
        if let negotiated { return negotiated.alpn }
        var data: UnsafePointer<UInt8>? = nil
        var length: UInt32 = 0
        SSL_get0_alpn_selected(ssl, &data, &length)
        guard let data, length > 0 else { return nil }
        return String(decoding: UnsafeBufferPointer(start: data, count: Int(length)), as: UTF8.self)
    }

    /// The verified client certificate's name (its CN, or its first subjectAltName).
    public func peerName(subjectAltName: Bool) -> String? {
        guard layer == nil else { return nil }  // asked at the handshake's end, before the `SSL` goes
        guard SSL_get_verify_result(ssl) == X509_V_OK else { return nil }
        var out = [CChar](repeating: 0, count: 256)
        let n = igris_ssl_peer_name(ssl, subjectAltName ? 1 : 0, &out, out.count)
        guard n > 0 else { return nil }
        return String(decoding: out.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: - Memory

    /// Gives back what the memory BIOs grew to, where drained: for a connection whose
    /// traffic paused.
    /// `threshold`: bytes that must have gone through a BIO since its last replacement (0
    /// after a handshake: whatever it holds is no longer needed).
    public func releaseMemory(threshold: Int = TLSSession.trimThreshold) {
        if let layer { layer.releaseMemory(); return }
        trimIfDrained(threshold)
        trimOutputIfDrained(threshold)
    }

    private func trimIfDrained(_ threshold: Int) {
        // In place there is no memory BIO to trim (and replacing the input would undo it).
        guard !inPlace, fedSinceTrim > threshold, BIO_ctrl_pending(inputBIO) == 0, let fresh = BIO_new(BIO_s_mem()) else { return }
        BIO_ctrl(fresh, BIO_C_SET_BUF_MEM_EOF_RETURN, -1, nil)
        SSL_set0_rbio(ssl, fresh)  // frees the old one
        inputBIO = fresh
        fedSinceTrim = 0
    }

    private func trimOutputIfDrained(_ threshold: Int) {
        guard takenSinceTrim > threshold, BIO_ctrl_pending(outputBIO) == 0, let fresh = BIO_new(BIO_s_mem()) else { return }
        BIO_ctrl(fresh, BIO_C_SET_BUF_MEM_EOF_RETURN, -1, nil)
        SSL_set0_wbio(ssl, fresh)
        outputBIO = fresh
        takenSinceTrim = 0
    }
}
