import Glibc

/// A session over a blocking socket: for the control plane (the admin endpoint's own thread)
/// and the load generator, never a worker (workers drive sessions with their own recv and
/// send, `TLSSession`). Timeouts are the socket's (SO_RCVTIMEO / SO_SNDTIMEO).
public final class BlockingTLSStream: @unchecked Sendable {
    public let fd: Int32
    public let session: TLSSession
    private let buffer = UnsafeMutableRawPointer.allocate(byteCount: 64 * 1024, alignment: 64)
    private static let bufferSize = 64 * 1024

    /// Runs the handshake on `fd` (connected, blocking). Throws the failure, after sending
    /// the alert OpenSSL made for it. (A throw here still runs `deinit`: every property is set.)
    public init(fd: Int32, session: TLSSession) throws(TLSFailure) {
        self.fd = fd
        self.session = session
        var step = session.handshake()
        while true {
            let sent = flush()
            switch step {
            case .done:
                guard sent else { throw TLSFailure(.peerGone, "send failed") }
                return
            case .failed(let failure):
                throw failure
            case .wantInput:
                let n = recv(fd, buffer, Self.bufferSize, 0)
                guard sent, n > 0 else { throw TLSFailure(n == 0 ? .peerGone : .timeout, "the peer closed or went quiet") }
                session.feed(buffer, count: n)
                step = session.handshake()
            }
        }
    }

    deinit { buffer.deallocate() }

    /// Sends every pending record; false when the socket failed.
    @discardableResult
    public func flush() -> Bool {
        while session.pendingOutput > 0 {
            let n = session.takeOutput(into: buffer, capacity: Self.bufferSize)
            var offset = 0
            while offset < n {
                let k = send(fd, buffer + offset, n - offset, Int32(MSG_NOSIGNAL))
                if k <= 0 { return false }
                offset += k
            }
        }
        return true
    }

    public func write(_ bytes: UnsafeRawPointer, count: Int) -> Bool {
        session.write(bytes, count: count) && flush()
    }

    /// Plaintext into `into`: bytes read (at least one), 0 at the peer's end (close_notify
    /// or EOF), -1 on failure or timeout.
    public func read(into: UnsafeMutableRawPointer, capacity: Int) -> Int {
        while true {
            switch session.read(into: into, capacity: capacity) {
            case .bytes(let n): return n
            case .closed: return 0
            case .failed: return -1
            case .wantInput:
                let n = recv(fd, buffer, Self.bufferSize, 0)
                if n == 0 { return 0 }
                if n < 0 { return -1 }
                session.feed(buffer, count: n)
            }
        }
    }

    /// close_notify (the socket stays the caller's to close).
    public func finish() {
        session.shutdown()
        flush()
    }
}
