import Glibc
import CURing

/// Which kernel interface a worker drives.
public enum BackendKind: String, Sendable, CaseIterable, CustomStringConvertible {
    case ioUring = "io_uring"
    case epoll

    public var description: String { rawValue }
}

/// `--splice`: how bulk directions move bytes.
public enum SpliceMode: String, Sendable, CaseIterable {
    /// Start on copy; switch a direction to splice once it carries bulk data.
    case auto
    /// Every direction splices from its first byte.
    case always
    /// Copy through the buffer pool only.
    case never
}

/// Settings one backend instance is built with (per worker).
public struct BackendConfiguration: Sendable {
    /// Size of each pooled buffer (bytes).
    public var bufferSize: Int
    /// Number of pooled buffers per worker; a power of two (the io_uring buffer ring needs it).
    public var bufferCount: Int
    /// Submission queue entries (io_uring).
    public var ringEntries: UInt32
    /// io_uring: sends of at least this many bytes use IORING_OP_SEND_ZC (nil: never).
    public var zeroCopySendThreshold: Int?

    public init(bufferSize: Int = 64 * 1024, bufferCount: Int = 256, ringEntries: UInt32 = 4096, zeroCopySendThreshold: Int? = nil) {
        self.bufferSize = bufferSize
        self.bufferCount = bufferCount
        self.ringEntries = ringEntries
        self.zeroCopySendThreshold = zeroCopySendThreshold
    }
}

/// The completion-style interface a `Worker` drives. Operations are queued with a token;
/// `waitForCompletions` submits everything queued (one kernel entry on io_uring) and waits
/// up to a timeout; `drainCompletions` then hands back each finished operation.
///
/// Buffers: `recv` never takes a buffer up front. The backend picks one from the worker's
/// `BufferPool` only when bytes are there (provided buffer ring on io_uring, a free list on
/// epoll) and reports it in `Completion.bufferID`; the worker returns it with
/// `releaseBuffer` once the bytes are sent. No free buffer → the recv completes `-ENOBUFS`.
///
/// Implementations are final classes confined to their worker thread; the worker is generic
/// over them, so every call is statically dispatched.
public protocol IOBackend: AnyObject {
    static var kind: BackendKind { get }
    // Every socket handed to a backend is O_NONBLOCK: epoll needs it, and on io_uring a
    // splice into a socket honours only the socket's O_NONBLOCK (not SPLICE_F_NONBLOCK), so a
    // blocking socket would park an io-wq thread on a slow reader.

    var buffers: BufferPool { get }

    /// Multishot accept: completes once per accepted fd with `more` set while armed.
    func accept(listener fd: Int32, token: OperationToken)
    /// Connect; `address` must stay valid until the completion.
    func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, token: OperationToken)
    /// Receive into a buffer the backend selects from the pool.
    func recv(fd: Int32, token: OperationToken)
    /// Send `length` bytes of pool buffer `buffer` starting at `offset`.
    func send(fd: Int32, buffer: UInt16, offset: Int, length: Int, token: OperationToken)
    /// shutdown(fd, SHUT_WR).
    func shutdownWrite(fd: Int32, token: OperationToken)
    /// Cancels every operation pending on `fd` (each completes, typically -ECANCELED),
    /// then closes it. The close completes with `token`.
    func cancelAndClose(fd: Int32, token: OperationToken)
    /// Cancels every operation pending on `fd` without closing it (each completes
    /// -ECANCELED). Used to stop a multishot accept while accepting is paused.
    func cancel(fd: Int32)
    /// Completes once when `fd` is readable (epoll: at once unless a read on it last saw EAGAIN).
    func pollReadable(fd: Int32, token: OperationToken)
    /// Completes once when `fd` is writable (epoll: at once unless a write last saw EAGAIN).
    func pollWritable(fd: Int32, token: OperationToken)
    /// splice(socket → pipe) of at most `length` bytes with SPLICE_F_NONBLOCK: bytes moved,
    /// 0 at EOF, -EAGAIN when the socket had nothing (poll first; io_uring runs splices on
    /// io-wq threads, and a non-blocking one never parks a thread on an idle socket).
    func spliceIn(socket: Int32, pipe: Int32, length: Int, token: OperationToken)
    /// splice(pipe → socket) of at most `length` bytes with SPLICE_F_NONBLOCK; -EAGAIN when
    /// the socket's send buffer is full.
    func spliceOut(pipe: Int32, socket: Int32, length: Int, token: OperationToken)
    /// Empties the worker's wake eventfd after its poll completed.
    func consumeWake(fd: Int32)
    /// Returns a buffer to the pool (and, on io_uring, to the kernel's buffer ring).
    func releaseBuffer(_ id: UInt16)

    /// Submits queued operations and waits until at least one completion is ready or
    /// `timeoutNanoseconds` passed (nil: no limit; 0: don't wait).
    func waitForCompletions(timeoutNanoseconds: UInt64?) throws(SyscallError)
    /// Hands every ready completion to `body`. `body` may queue new operations.
    func drainCompletions(_ body: (Completion) -> Void)

    /// Completions the kernel had to hold back because the CQ was full (0 on epoll).
    var completionOverflows: UInt64 { get }
}
