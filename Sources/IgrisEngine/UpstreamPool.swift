import Glibc
import IgrisPolicy
import IgrisProtocols
import IgrisTLS
import Synchronization

/// How a forward listener picks the server for a new connection.
public enum BalanceAlgorithm: String, Sendable, CaseIterable {
    /// Each in turn.
    case roundRobin = "round_robin"
    /// The one with the fewest open connections (all workers together).
    case leastConn = "least_conn"
    /// By a hash of the client's address: a client keeps its server while the set of
    /// healthy servers stays the same.
    case sourceHash = "source_hash"
}

/// Active TCP health checks: a connect every `interval`; `fall` failures in a row take a
/// server out of rotation, `rise` successes bring it back.
public struct HealthCheck: Sendable, Equatable {
    public var intervalNanoseconds: UInt64
    public var timeoutNanoseconds: UInt64
    public var rise: Int
    public var fall: Int

    public init(intervalNanoseconds: UInt64 = 2_000_000_000, timeoutNanoseconds: UInt64 = 1_000_000_000, rise: Int = 2, fall: Int = 3) {
        self.intervalNanoseconds = intervalNanoseconds
        self.timeoutNanoseconds = timeoutNanoseconds
        self.rise = rise
        self.fall = fall
    }
}

/// The servers behind a forward listener, shared by every worker: their health (written by
/// the one worker that checks the pool) and open connections (for least_conn), as atomics.
public final class UpstreamPool: @unchecked Sendable {
    /// A connection tries each server at most once; the bitmask of tried servers is 64 bits.
    public static let maxServers = 64

    public let name: String
    public let servers: [SocketAddress]
    public let balance: BalanceAlgorithm
    public let healthCheck: HealthCheck?
    /// Send a PROXY header to these servers (overrides the listener's setting).
    public let sendProxyProtocol: ProxyProtocol.Version?
    /// upstream_tls: TLS toward these servers (plain in, TLS out).
    public let tls: TLSClientContext?
    /// `source:` the local addresses connections to these servers come from, in turn (port
    /// chosen at connect). One address gives about 28,000 ports toward each server, shared
    /// by open connections and TIME_WAIT; each more address adds as many again, and the
    /// kernel's port search in connect() stays short when the space is sparse.
    public let sources: [SocketAddress]

    /// Stable copies of the addresses: io_uring reads a connect's address at submission,
    /// a loop turn after the call. Immutable after init (hence @unchecked Sendable).
    let addresses: UnsafeMutablePointer<sockaddr_storage>
    private final class ServerState: Sendable {
        let up = Atomic<Bool>(true)
        let active = Atomic<Int>(0)
    }
    private let state: [ServerState]
    private let turn = Atomic<Int>(0)
    private let sourceTurn = Atomic<Int>(0)

    public init(name: String, servers: [SocketAddress], balance: BalanceAlgorithm = .roundRobin, healthCheck: HealthCheck? = nil,
                sendProxyProtocol: ProxyProtocol.Version? = nil, tls: TLSClientContext? = nil, sources: [SocketAddress] = []) {
        precondition(!servers.isEmpty && servers.count <= Self.maxServers)
        self.name = name
        self.servers = servers
        self.balance = balance
        self.healthCheck = healthCheck
        self.sendProxyProtocol = sendProxyProtocol
        self.tls = tls
        self.sources = sources.map { $0.withPort(0) }
        serverDescriptions = servers.map(\.description)
        addresses = .allocate(capacity: servers.count)
        for (i, s) in servers.enumerated() { (addresses + i).initialize(to: s.storage) }
        state = servers.map { _ in ServerState() }
    }

    deinit { addresses.deallocate() }

    /// A server's address for logs (formatted once, not per connection).
    public func describe(_ server: Int) -> String { serverDescriptions[server] }
    private let serverDescriptions: [String]

    public func isUp(_ server: Int) -> Bool { state[server].up.load(ordering: .relaxed) }
    func setUp(_ server: Int, _ up: Bool) { state[server].up.store(up, ordering: .relaxed) }
    public func activeConnections(_ server: Int) -> Int { state[server].active.load(ordering: .relaxed) }
    func acquire(_ server: Int) { state[server].active.wrappingAdd(1, ordering: .relaxed) }
    func release(_ server: Int) { state[server].active.wrappingSubtract(1, ordering: .relaxed) }

    /// The next source address of `family` (in turn), or nil: the kernel picks the source.
    func source(family: Int32) -> SocketAddress? {
        guard !sources.isEmpty else { return nil }
        let start = Int(UInt(bitPattern: sourceTurn.wrappingAdd(1, ordering: .relaxed).oldValue) % UInt(sources.count))
        for k in 0..<sources.count where sources[(start + k) % sources.count].family == family {
            return sources[(start + k) % sources.count]
        }
        return nil
    }

    /// Whether this host can connect from `address`: nil, or why not (checked when the
    /// configuration is read, so a typo is a startup error, not a failed connection each time).
    public static func checkSource(_ address: SocketAddress) -> String? {
        do {
            Syscall.close(try Syscall.streamSocket(family: address.family, source: address))
            return nil
        } catch {
            return error.errno == EADDRNOTAVAIL ? "\(address.ipAddress) is not an address of this host" : "\(error)"
        }
    }

    /// A `source:` address from operator text (an IP address of this host), or the one-line
    /// reason it can't be one.
    public static func source(_ text: String) -> Result<SocketAddress, SourceError> {
        guard let ip = IPAddress(Substring(text)) else { return .failure(SourceError(description: "expected an IP address such as 10.0.0.2, got '\(text)'")) }
        let address = SocketAddress(ip: ip, port: 0)
        if let problem = checkSource(address) { return .failure(SourceError(description: problem)) }
        return .success(address)
    }

    public struct SourceError: Error, CustomStringConvertible {
        public let description: String
    }

    /// A healthy server this connection has not tried yet, or nil.
    func pick(tried: UInt64, clientHash: UInt64) -> Int? {
        let n = servers.count
        @inline(__always) func eligible(_ i: Int) -> Bool { tried & (1 << UInt64(i)) == 0 && isUp(i) }
        switch balance {
        case .roundRobin:
            let start = UInt(bitPattern: turn.wrappingAdd(1, ordering: .relaxed).oldValue)
            for k in 0..<n {
                let i = Int((start &+ UInt(k)) % UInt(n))
                if eligible(i) { return i }
            }
        case .sourceHash:
            let start = Int(clientHash % UInt64(n))
            for k in 0..<n where eligible((start + k) % n) { return (start + k) % n }
        case .leastConn:
            let start = UInt(bitPattern: turn.wrappingAdd(1, ordering: .relaxed).oldValue)
            var best: Int? = nil
            for k in 0..<n {
                let i = Int((start &+ UInt(k)) % UInt(n))
                guard eligible(i) else { continue }
                if best == nil || activeConnections(i) < activeConnections(best!) { best = i }
            }
            return best
        }
        return nil
    }
}
