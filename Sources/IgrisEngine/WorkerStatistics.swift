import Glibc
import Synchronization
import IgrisTLS

/// Counters one worker writes and the admin plane (and tests) read.
///
/// Single writer per instance: the worker updates with a relaxed load + store (no locked
/// read-modify-write on the hot path); readers sum across workers with relaxed loads.
public final class WorkerStatistics: Sendable {
    public enum Counter: Int, CaseIterable, Sendable {
        case activeConnections
        case acceptedTotal
        case rejectedAtCapacity
        case sourceConnectionRejections  // refused: the source was at max_connections_per_source
        case handshakeLimitRejections    // refused: max_handshakes connections were negotiating
        case sourceHandshakeRejections   // refused: the source was at max_handshakes_per_source
        case handshakesActive            // gauge: counted handshakes open now
        case handshakesEvicted           // at max_handshakes, a stalled handshake was reset for a newcomer
        case acceptPauses            // EMFILE/ENFILE: accepting paused ~100 ms
        case acceptPaused            // gauge: 1 while accepting pauses for lack of descriptors (last second)
        case acceptErrors
        case threadID                // gauge: the worker thread's kernel id (0 until it runs)
        case connectFailures         // refused, unreachable, …
        case connectTimeouts
        case idleTimeouts
        case deadPeers               // closed because a peer stopped answering (dead_peer_timeout)
        case closedGracefully
        case closedAborted           // RST/error on one side aborted the other
        case bytesClientToUpstream
        case bytesUpstreamToClient
        case buffersInUse
        case buffersPeak
        case bufferExhaustions       // recv completed ENOBUFS, waited for a buffer
        case buffersActive           // gauge: buffers in circulation (free or lent)
        case buffersParked           // buffers taken out of circulation, pages given back
        case roomWaits               // a direction waited for room in its destination before reading
        case shortSends              // the destination took part of a send: the rest waits, holding its buffer
        case reserveWaits            // only the pool's reserve was left: a direction waited to read
        case completionOverflows     // io_uring CQ overflow events
        case cancellations           // operations closes cancelled (by user_data on io_uring)
        case drainAborted            // bridges still open at the drain deadline
        case busyPolls               // waits that polled first (busy_poll)
        case busyPollHits            // of those, polls that found a completion before sleeping
        case pipesInUse
        case pipesPeak
        case spliceBytes             // bytes moved socket → pipe → socket (both directions)
        case spliceWouldBlock        // splices that found nothing to move (EAGAIN): polled again
        case pipeFallbacks           // no pipe to be had: the direction stayed on copy
        case spliceBytesDropped      // bytes left in a pipe when its bridge was aborted
        case spliceSwitches          // auto: directions moved from copy to splice
        case directBridges           // bridges whose sockets moved to the ring's fixed-file table
        case directDescriptorMisses  // the table was full: the bridge kept its descriptors
        // SOCKS5 / HTTP CONNECT
        case handshakesCompleted     // reached bridging
        case handshakeFailures       // malformed, unsupported or unauthenticated: replied and closed
        case handshakeTimeouts       // closed at the handshake timeout
        case authFailures            // wrong user/password, expired, rate-limited
        case authBusy                // the password-check queue had no room: refused unchecked
        case aclDenied               // destination refused by the ACL (0x02 / 403)
        case resolveFailures
        case userLimitRejections     // user at max_connections
        case accountsRevoked         // tunnels ended because their user expired or was removed
        case throttlePauses          // a rate-limited direction paused its recv
        case bytesAfterRequestDropped  // HTTP proxy: bytes a client sent past a forwarded request's body
        case proxyHeaderRejected     // accept_proxy_protocol: missing or malformed PROXY header
        // SOCKS5 UDP ASSOCIATE
        case udpAssociationsActive   // gauge (add/subtract)
        case udpAssociationsTotal
        case udpRelayPortsExhausted  // no free port in udp_relay_ports for a new association
        case udpDatagramsToDestination
        case udpDatagramsToClient
        case udpBytesToDestination
        case udpBytesToClient
        // Drops, in `DatagramDrop` order (see `udpDropCounter`).
        case udpDropMalformed, udpDropFragmented, udpDropForeignSource, udpDropDenied, udpDropUnresolved, udpDropLimit, udpDropSendFailed
        // TLS
        case tlsHandshakes           // completed, with clients and with upstreams
        case tlsResumed              // of those, resumed from a session ticket
        case tlsClientIdentities     // a client certificate named the connection's user
        case tlsOffloaded            // connections whose TLS went to the kernel (kTLS) after the handshake
        case tlsRecordsWithoutOpenSSL  // TLS 1.3 connections whose records went on without OpenSSL's SSL object
        case tlsOffloadFailures      // kTLS attempts the kernel refused
        // Handshake failures, in `TLSFailure.Reason` order (see `tlsFailureCounter`).
        case tlsFailPlaintext, tlsFailVersion, tlsFailCipher, tlsFailUnknownName, tlsFailALPN, tlsFailClientCertificate
        case tlsFailServerCertificate, tlsFailBadRecord, tlsFailPeerAlert, tlsFailMalformed, tlsFailPeerGone, tlsFailTimeout
        case tlsRecordFailures       // bridging: a record failed (bad MAC, malformed): the connection was reset
        case serversDown             // health checks took a server out of rotation
        case serversUp               // health checks put a server back
    }

    /// The counter of a datagram drop reason.
    public static func udpDropCounter(_ reason: DatagramDrop) -> Counter {
        Counter(rawValue: Counter.udpDropMalformed.rawValue + reason.rawValue)!
    }

    /// The counter of a TLS handshake failure reason.
    public static func tlsFailureCounter(_ reason: TLSFailure.Reason) -> Counter {
        Counter(rawValue: Counter.tlsFailPlaintext.rawValue + TLSFailure.Reason.allCases.firstIndex(of: reason)!)!
    }

    /// Atomic is ~Copyable, so each lives in a cell of its own (allocated once).
    private final class Cell: Sendable {
        let value = Atomic<Int64>(0)
    }

    /// Per listener (the server's listener order), per worker.
    public enum ListenerCounter: Int, CaseIterable, Sendable {
        case accepted
        case active
        case bytesClientToUpstream
        case bytesUpstreamToClient

        /// `allCases.count` without building the array (this runs per forwarded chunk).
        static let count = 4
    }

    /// Upper bounds (ns) of the upstream connect latency histogram's buckets; one more
    /// bucket counts everything slower.
    public static let connectLatencyBounds: [UInt64] = [
        100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
        100_000_000, 250_000_000, 500_000_000, 1_000_000_000, 2_500_000_000, 5_000_000_000,
    ]

    private let cells: [Cell]
    private let listenerCells: [Cell]
    private let latencyBuckets: [Cell]
    private let latencySum = Cell()
    private let tlsBuckets: [Cell]
    private let tlsSum = Cell()
    public let listenerCount: Int

    public init(listeners: Int = 0) {
        cells = Counter.allCases.map { _ in Cell() }
        listenerCount = listeners
        listenerCells = (0..<(listeners * ListenerCounter.count)).map { _ in Cell() }
        latencyBuckets = (0...Self.connectLatencyBounds.count).map { _ in Cell() }
        tlsBuckets = (0...Self.connectLatencyBounds.count).map { _ in Cell() }
    }

    @inline(__always)
    public func add(listener: Int, _ counter: ListenerCounter, _ delta: Int64 = 1) {
        let a = listenerCells[listener * ListenerCounter.count + counter.rawValue]
        a.value.store(a.value.load(ordering: .relaxed) &+ delta, ordering: .relaxed)
    }

    public func load(listener: Int, _ counter: ListenerCounter) -> Int64 {
        listenerCells[listener * ListenerCounter.count + counter.rawValue].value.load(ordering: .relaxed)
    }

    /// One successful upstream connect that took `nanoseconds`.
    public func recordConnectLatency(_ nanoseconds: UInt64) { Self.record(nanoseconds, latencyBuckets, latencySum) }

    /// Per-bucket counts (not cumulative) and the sum in ns.
    public func connectLatency() -> (buckets: [Int64], sumNanoseconds: Int64) {
        (latencyBuckets.map { $0.value.load(ordering: .relaxed) }, latencySum.value.load(ordering: .relaxed))
    }

    /// One completed TLS handshake that took `nanoseconds` (from accept, or from the
    /// upstream connect).
    public func recordTLSHandshake(_ nanoseconds: UInt64) { Self.record(nanoseconds, tlsBuckets, tlsSum) }

    /// Like `connectLatency`, for TLS handshakes (same bounds).
    public func tlsHandshakeDuration() -> (buckets: [Int64], sumNanoseconds: Int64) {
        (tlsBuckets.map { $0.value.load(ordering: .relaxed) }, tlsSum.value.load(ordering: .relaxed))
    }

    private static func record(_ nanoseconds: UInt64, _ buckets: [Cell], _ sum: Cell) {
        var b = 0
        while b < connectLatencyBounds.count && nanoseconds > connectLatencyBounds[b] { b += 1 }
        let cell = buckets[b]
        cell.value.store(cell.value.load(ordering: .relaxed) &+ 1, ordering: .relaxed)
        sum.value.store(sum.value.load(ordering: .relaxed) &+ Int64(nanoseconds), ordering: .relaxed)
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
