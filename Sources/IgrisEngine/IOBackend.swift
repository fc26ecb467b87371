import Glibc
import CLinux

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
    /// Pooled buffers per worker at most (its share of `buffer_memory`); a power of two (the
    /// io_uring buffer ring needs it). The pool starts smaller and grows on demand.
    public var bufferCount: Int
    /// Buffers in circulation at start, and the fewest the pool shrinks back to.
    public var initialBufferCount: Int = 64
    /// Submission queue entries (io_uring).
    public var ringEntries: UInt32
    /// io_uring: sends of at least this many bytes use IORING_OP_SEND_ZC (nil: never).
    public var zeroCopySendThreshold: Int?
    /// io_uring: entries of the ring's fixed-file table, where bridged connections' sockets
    /// move (`IOBackend.makeDirect`); 0: off.
    public var directDescriptors: Int = 0

    public init(bufferSize: Int = 64 * 1024, bufferCount: Int = 256, ringEntries: UInt32 = 4096, zeroCopySendThreshold: Int? = nil) {
        self.bufferSize = bufferSize
        self.bufferCount = bufferCount
        self.ringEntries = ringEntries
        self.zeroCopySendThreshold = zeroCopySendThreshold
    }

    /// `buffer_memory` when the operator gives none: 4 KiB per allowed connection (a
    /// quarter of a default buffer each: most connections are idle or interactive), at least
    /// 16 MiB per worker and at most 1 GiB unless the workers' minimum needs more.
    public static func defaultBufferMemory(maxConnections: Int, workers: Int) -> Int {
        let floor = workers * 16 << 20
        return max(floor, min(1 << 30, maxConnections * 4096))
    }

    /// Each worker's buffer count for a memory budget: its share, in buffers, rounded down
    /// to a power of two between 2 and 32768.
    public static func bufferCount(memory: Int, bufferSize: Int, workers: Int) -> Int {
        let share = max(2, min(32768, memory / max(1, workers) / bufferSize))
        return 1 << (Int.bitWidth - 1 - share.leadingZeroBitCount)
    }
}

/// A socket in an io_uring ring's fixed-file table (a direct descriptor) instead of the
/// process's descriptor table, which RLIMIT_NOFILE bounds: its table entry with `flag` set.
/// As a descriptor number it names nothing, so a plain syscall on it fails with EBADF; the
/// worker asks none of it (no SO_MEMINFO room check, no splice) and the ring's operations
/// name the entry with IOSQE_FIXED_FILE.
public enum DirectDescriptor {
    public static let flag: Int32 = 1 << 30

    @inline(__always)
    public static func isDirect(_ fd: Int32) -> Bool { fd >= 0 && fd & flag != 0 }

    @inline(__always)
    static func entry(_ fd: Int32) -> Int32 { fd & ~flag }
}

/// The completion-style interface a `Worker` drives, and the only way the engine touches a
/// socket once a backend owns it: every read, write, poll, shutdown and close goes through
/// here, so a backend's view of a socket (epoll's readiness cache, io_uring's splices in
/// flight) is never stale. Each operation means the same on both backends.
///
/// Queued operations complete with their token: `waitForCompletions` submits everything
/// queued (one kernel entry on io_uring) and waits up to a timeout; `drainCompletions` then
/// hands back each finished operation. The synchronous calls (`peek`, `receiveNow`,
/// `sendNow`, `shutdown`) never block and return bytes or -errno at once.
///
/// Buffers: `recv` never takes a buffer up front. The backend picks one from the worker's
/// `BufferPool` only when bytes are there and reports it in `Completion.bufferID`; the worker
/// returns it with `releaseBuffer` once the bytes are sent. No free buffer → the recv
/// completes `-ENOBUFS`.
///
/// Every socket handed to a backend is O_NONBLOCK (a splice into a socket honours only the
/// socket's own flag). Implementations are final classes confined to their worker thread;
/// the worker is generic over them, so every call is statically dispatched.
public protocol IOBackend: AnyObject {
    var buffers: BufferPool { get }

    /// Accept. `multishot`: completes once per accepted fd with `more` set while armed, and
    /// an error ends it; otherwise it completes once, for one connection (the worker arms
    /// single accepts when it has room for only a few more, so that connections beyond its
    /// capacity stay in the kernel's backlog instead of being accepted only to be closed).
    func accept(listener fd: Int32, multishot: Bool, token: OperationToken)
    /// The most connections an armed multishot accept may take before the worker sees the
    /// first of them (and can stop it): past its room, they would only be closed.
    var acceptBurst: Int { get }
    /// Ends the multishot accept armed with `token` (it completes -ECANCELED); the
    /// listener stays open and its backlog keeps filling.
    func stopAccepting(listener fd: Int32, token: OperationToken)
    /// Connect; `address` must stay valid until the completion.
    func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, token: OperationToken)
    /// Receive at most `limit` bytes (0: a whole buffer) into a buffer the backend selects
    /// from the pool (from its reserve when `reserve`): bytes, 0 at EOF, -errno.
    func recv(fd: Int32, limit: Int, reserve: Bool, token: OperationToken)
    /// Send `length` bytes of pool buffer `buffer` starting at `offset`: bytes sent (maybe
    /// fewer), or -errno. Completes once the buffer may be reused (SEND_ZC included).
    func send(fd: Int32, buffer: UInt16, offset: Int, length: Int, token: OperationToken)
    /// shutdown(fd, SHUT_WR), queued: 0 or -errno.
    func shutdownWrite(fd: Int32, token: OperationToken)
    /// Completes once `fd` has input: bytes, EOF or an error (a peek would not say EAGAIN).
    func pollReadable(fd: Int32, token: OperationToken)
    /// Completes once `fd` has room to write (or an error).
    func pollWritable(fd: Int32, token: OperationToken)
    /// splice(socket → pipe) of at most `length` bytes, non-blocking: bytes moved, 0 at EOF,
    /// -EAGAIN when the socket had nothing or the pipe had no room.
    func spliceIn(socket: Int32, pipe: Int32, length: Int, token: OperationToken)
    /// splice(pipe → socket) of at most `length` bytes; -EAGAIN when the socket is full.
    func spliceOut(pipe: Int32, socket: Int32, length: Int, token: OperationToken)
    /// Cancels `pending` (each completes, typically -ECANCELED), then closes `fd` — sending
    /// RST instead of FIN when `abort` — and completes with `token` once the descriptor is
    /// closed. A splice still running on `fd` delays the close, never the other way round:
    /// a descriptor number is only reused once nothing can touch it.
    func close(fd: Int32, pending: PendingOperations, abort: Bool, token: OperationToken)

    /// Copies up to `length` queued bytes without taking them: bytes, 0 at EOF, -EAGAIN.
    func peek(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int
    /// Takes up to `length` queued bytes: bytes, 0 at EOF, -EAGAIN.
    func receiveNow(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int
    /// Sends a small message (a handshake reply, a PROXY header) from caller memory: bytes
    /// sent or -errno. Meant for a socket's first bytes, which its send buffer takes whole.
    func sendNow(fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int
    /// Arms a continuous receive of datagrams on `fd` into the backend's own buffers (io_uring:
    /// a multishot recvmsg from a provided-buffer ring of its own): each datagram completes
    /// `token` with a `bufferID` for `datagram(_:length:)`, to be given back with
    /// `releaseDatagram`. False where the backend has none (epoll): the caller polls for
    /// readable and takes them with `receiveDatagrams`.
    func armDatagramReceive(fd: Int32, token: OperationToken) -> Bool
    /// The datagram a continuous receive delivered in `buffer`.
    func datagram(_ buffer: UInt16, length: Int) -> ReceivedDatagram?
    func releaseDatagram(_ buffer: UInt16)
    /// Datagrams queued on a UDP socket, at once, into `batch`'s slots: how many, or -errno
    /// (-EAGAIN: none).
    func receiveDatagrams(fd: Int32, into batch: DatagramBatch) -> Int
    /// `batch`'s queued datagrams, at once: how many went (the first ones; what a full
    /// buffer doesn't take is dropped, as UDP would), or -errno; their bytes in `bytes`.
    func sendDatagrams(fd: Int32, from batch: DatagramBatch, bytes: inout Int) -> Int
    /// shutdown(fd, how) at once: 0 or -errno.
    func shutdown(fd: Int32, how: Int32) -> Int32

    /// Moves a bridged connection's two sockets into the ring's fixed-file table and closes
    /// their regular descriptors, so that they no longer count against RLIMIT_NOFILE: the
    /// pair's `DirectDescriptor`s, or nil with both left as they were (off, epoll, the table
    /// full, or the kernel refused).
    func makeDirect(client: Int32, upstream: Int32) -> (client: Int32, upstream: Int32)?
    /// Sockets the fixed-file table holds at most (0: no direct descriptors).
    var directCapacity: Int { get }

    /// Empties the worker's wake eventfd after its poll completed.
    func consumeWake(fd: Int32)
    /// Returns a buffer to the pool (and, on io_uring, to the kernel's buffer ring), or parks
    /// it while the pool shrinks.
    func releaseBuffer(_ id: UInt16)
    /// Once a second: the pool sets its target from recent use and gives back what it can.
    func adjustBuffers()

    /// Submits queued operations and waits until at least one completion is ready or
    /// `timeoutNanoseconds` passed (nil: no limit; 0: don't wait).
    func waitForCompletions(timeoutNanoseconds: UInt64?) throws(SyscallError)
    /// Hands every ready completion to `body`. `body` may queue new operations.
    func drainCompletions(_ body: (Completion) -> Void)
    /// A completion is ready for `drainCompletions` (looked up without a syscall).
    var hasCompletions: Bool { get }

    /// Completions the kernel had to hold back because the CQ was full (0 on epoll).
    var completionOverflows: UInt64 { get }
    /// Operations closes cancelled (io_uring: cancel requests, each naming one operation by
    /// its user_data; epoll: waits completed -ECANCELED). Per close, at most the two the
    /// worker names, however many connections are open.
    var cancellations: UInt64 { get }
}
