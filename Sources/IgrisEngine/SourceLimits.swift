import IgrisPolicy

/// Bounds per client source, shared by every worker, so that no one address can take the
/// gateway's connections for itself, and sockets that never finish a handshake (idle,
/// unauthenticated) can't take them from clients that would:
///
/// - `maxConnectionsPerSource`: open connections from one source;
/// - `maxHandshakes`: connections still negotiating (SOCKS5, HTTP CONNECT, a PROXY header),
///   all sources together (each worker enforces its share, and at its share makes room by
///   resetting its oldest stalled handshake: see `Worker.evictStalledHandshake`);
/// - `maxHandshakesPerSource`: the same, from one source.
///
/// A source is an IPv4 address or an IPv6 /64 (`IPAddress.failureKey`). 0: no limit.
/// Touched once when a connection is admitted, once when its handshake ends and once when
/// it closes — never per byte.
public final class SourceLimits: Sendable {
    public struct Settings: Sendable, Equatable {
        public var maxConnectionsPerSource = 0
        public var maxHandshakes = 0
        public var maxHandshakesPerSource = 0

        public init(maxConnectionsPerSource: Int = 0, maxHandshakes: Int = 0, maxHandshakesPerSource: Int = 0) {
            self.maxConnectionsPerSource = maxConnectionsPerSource
            self.maxHandshakes = maxHandshakes
            self.maxHandshakesPerSource = maxHandshakesPerSource
        }

        /// What `igris serve` uses unless told otherwise: a quarter of the connections per
        /// source, half of them in handshakes, and at most 64 handshakes per source.
        public static func defaults(maxConnections: Int) -> Settings {
            Settings(maxConnectionsPerSource: max(1, maxConnections / 4), maxHandshakes: max(1, maxConnections / 2),
                     maxHandshakesPerSource: max(1, min(64, maxConnections / 4)))
        }

        /// The defaults, each replaced by the operator's value where given.
        public static func resolved(maxConnections: Int, perSource: Int?, handshakes: Int?, handshakesPerSource: Int?) -> Settings {
            var s = defaults(maxConnections: maxConnections)
            if let perSource { s.maxConnectionsPerSource = perSource }
            if let handshakes { s.maxHandshakes = handshakes }
            if let handshakesPerSource { s.maxHandshakesPerSource = handshakesPerSource }
            return s
        }

        public var isActive: Bool { maxConnectionsPerSource > 0 || maxHandshakes > 0 || maxHandshakesPerSource > 0 }
    }

    public enum Refusal: Sendable {
        case sourceConnections
        case sourceHandshakes
    }

    private struct Counts {
        var connections: Int32 = 0
        var handshakes: Int32 = 0
    }

    public let settings: Settings
    private let shards: [Locked<[IPAddress: Counts]>]

    public init(_ settings: Settings) {
        self.settings = settings
        shards = (0..<16).map { _ in Locked([:]) }
    }

    @inline(__always)
    private func shard(_ key: IPAddress) -> Locked<[IPAddress: Counts]> {
        shards[Int(truncatingIfNeeded: (key.high ^ key.low ^ (key.low >> 32)) & 15)]
    }

    /// Counts a new connection from `key` (a `failureKey`), as negotiating when `handshake`;
    /// nil when admitted, else what it would exceed (nothing is counted then).
    func admit(_ key: IPAddress, handshake: Bool) -> Refusal? {
        shard(key).withLock { map -> Refusal? in
            var c = map[key] ?? Counts()
            if handshake && settings.maxHandshakesPerSource > 0 && Int(c.handshakes) >= settings.maxHandshakesPerSource { return .sourceHandshakes }
            if settings.maxConnectionsPerSource > 0 && Int(c.connections) >= settings.maxConnectionsPerSource { return .sourceConnections }
            c.connections += 1
            if handshake { c.handshakes += 1 }
            map[key] = c
            return nil
        }
    }

    /// The connection's handshake is over (it connects onwards, or closes).
    func handshakeEnded(_ key: IPAddress) {
        shard(key).withLock { map in map[key]?.handshakes -= 1 }
    }

    /// The connection closed (after `handshakeEnded`, if it was counted as negotiating).
    func release(_ key: IPAddress) {
        shard(key).withLock { map in
            guard var c = map[key] else { return }
            c.connections -= 1
            if c.connections <= 0 { map[key] = nil } else { map[key] = c }
        }
    }

    /// Sources with a connection open now.
    public var sourcesNow: Int { shards.reduce(0) { $0 + $1.withLock { $0.count } } }
}
