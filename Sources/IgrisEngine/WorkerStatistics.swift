import Glibc
import Synchronization

/// Counters one worker writes and the admin plane (and tests) read.
///
/// Single writer per instance: the worker updates with a relaxed load + store (no locked
/// read-modify-write on the hot path); readers sum across workers with relaxed loads.
public final class WorkerStatistics: Sendable {
    public enum Counter: Int, CaseIterable, Sendable {
        case activeConnections
        case acceptedTotal
        case rejectedAtCapacity
        case acceptPauses            // EMFILE/ENFILE: accepting paused ~100 ms
        case acceptErrors
        case connectFailures         // refused, unreachable, …
        case connectTimeouts
        case idleTimeouts
        case closedGracefully
        case closedAborted           // RST/error on one side aborted the other
        case bytesClientToUpstream
        case bytesUpstreamToClient
        case buffersInUse
        case buffersPeak
        case bufferExhaustions       // recv completed ENOBUFS, waited for a buffer
        case completionOverflows     // io_uring CQ overflow events
        case drainAborted            // bridges still open at the drain deadline
        case pipesInUse
        case pipesPeak
        case spliceBytes             // bytes moved socket → pipe → socket (both directions)
        case spliceWouldBlock        // splices that found nothing to move (EAGAIN): polled again
        case pipeFallbacks           // no pipe to be had: the direction stayed on copy
        case spliceBytesDropped      // bytes left in a pipe when its bridge was aborted
        case spliceSwitches          // auto: directions moved from copy to splice
        // SOCKS5 / HTTP CONNECT
        case handshakesCompleted     // reached bridging
        case handshakeFailures       // malformed, unsupported or unauthenticated: replied and closed
        case handshakeTimeouts       // closed at the handshake timeout
        case authFailures            // wrong user/password, expired, rate-limited
        case aclDenied               // destination refused by the ACL (0x02 / 403)
        case resolveFailures
        case userLimitRejections     // user at max_connections
        case throttlePauses          // a rate-limited direction paused its recv
    }

    /// Atomic is ~Copyable, so each lives in a cell of its own (allocated once).
    private final class Cell: Sendable {
        let value = Atomic<Int64>(0)
    }

    private let cells: [Cell]

    public init() {
        cells = Counter.allCases.map { _ in Cell() }
    }

    @inline(__always)
    public func add(_ counter: Counter, _ delta: Int64 = 1) {
        let a = cells[counter.rawValue]
        a.value.store(a.value.load(ordering: .relaxed) &+ delta, ordering: .relaxed)
    }

    @inline(__always)
    public func set(_ counter: Counter, _ value: Int64) {
        cells[counter.rawValue].value.store(value, ordering: .relaxed)
    }

    public func load(_ counter: Counter) -> Int64 {
        cells[counter.rawValue].value.load(ordering: .relaxed)
    }
}
