import IgrisTLS
import IgrisPolicy
import IgrisProtocols

/// One listen address and what happens to the connections it accepts: the one listener
/// settings type, from the configuration file or command line to the worker. The server
/// fills in its defaults (`ServerConfiguration.resolved`) before a worker sees it.
public struct ListenerRule: Sendable {
    public var listen: SocketAddress
    /// For logs and metrics; the listen address when not given.
    public var name: String
    /// Where connections go when no negotiation picks a destination (a single upstream is a
    /// pool of one). nil: the negotiation decides (SOCKS5, HTTP CONNECT).
    public var pool: UpstreamPool?
    /// What is negotiated with the client before connecting (SOCKS5, HTTP CONNECT, a
    /// balancer's PROXY header); nil: a plain forward connects at once.
    public var negotiator: (any NegotiatorFactory)?
    /// Send a PROXY header with the client's address to the upstream first.
    public var sendProxyProtocol: ProxyProtocol.Version?
    /// Per-listener overrides of the server-wide settings (nil: the server's).
    public var splice: SpliceMode?
    public var connectTimeoutNanoseconds: UInt64?
    /// .some(nil): no idle timeout on this listener even if the server has one.
    public var idleTimeoutNanoseconds: UInt64??
    /// How long a peer may stay silent to TCP keepalive probes, or leave sent bytes
    /// unacknowledged, before its bridge is closed (.some(nil): never).
    public var deadPeerTimeoutNanoseconds: UInt64??
    /// Connections open at once through this listener, all workers together.
    public var maxConnections: Int?
    /// Sources not held to the per-source limits (`SourceLimits`): the balancers in front of
    /// a PROXY-protocol listener, through which every client arrives.
    public var sourceLimitsExempt: [CIDR] = []
    /// TLS with the clients: the handshake comes first, then the mode's negotiation.
    public var tls: TLSServerContext?
    /// A TLS forward's handshake must finish within this (default 10 s); a negotiating
    /// listener's whole handshake, TLS included, is bounded by its negotiation's timeout.
    public var handshakeTimeoutNanoseconds: UInt64?

    public init(listen: SocketAddress, name: String? = nil, pool: UpstreamPool? = nil, negotiator: (any NegotiatorFactory)? = nil) {
        self.listen = listen
        self.name = name ?? listen.description
        self.pool = pool
        self.negotiator = negotiator
    }

    /// A port forward to one upstream.
    public init(listen: SocketAddress, upstream: SocketAddress, name: String? = nil) {
        self.init(listen: listen, name: name, pool: UpstreamPool(name: name ?? listen.description, servers: [upstream]))
    }

    /// "forward", or the negotiator's name.
    public var modeName: String { pool != nil ? "forward" : negotiator?.name ?? "forward" }

    /// Everything that decides how this listener treats new connections, as text: two rules
    /// with the same name and signature are the same listener across a reload.
    var signature: String {
        [listen.description, pool?.signature ?? "-", negotiator.map { "\($0.name):\($0.signature)" } ?? "-",
         sendProxyProtocol?.rawValue ?? "-", splice?.rawValue ?? "-", "\(connectTimeoutNanoseconds ?? 0)",
         "\(String(describing: idleTimeoutNanoseconds))", "\(String(describing: deadPeerTimeoutNanoseconds))",
         "\(maxConnections ?? 0)", sourceLimitsExempt.map(\.description).joined(separator: ","),
         tls.map { "tls:\($0.fingerprint)" } ?? "-"].joined(separator: "|")
    }
}

extension UpstreamPool {
    var signature: String {
        let check = healthCheck.map { "\($0.intervalNanoseconds),\($0.timeoutNanoseconds),\($0.rise),\($0.fall)" } ?? "-"
        return "\(name);\(servers.map(\.description).joined(separator: ","));\(balance.rawValue);\(check);\(sendProxyProtocol?.rawValue ?? "-");\(tls?.fingerprint ?? "-")"
    }
}

/// A listener as a worker holds it: one of its SO_REUSEPORT sockets, its settings (defaults
/// filled in) and its share of max_connections. A worker usually holds one socket per
/// listener; after a hand-off from a process with more workers, some hold several.
public struct BoundListener: Sendable {
    public var fd: Int32
    public var rule: ListenerRule
    public var budget: ConnectionBudget?
    /// The server's index of the listener (per-listener counters, reload commands).
    public var index: Int

    public init(fd: Int32, rule: ListenerRule, budget: ConnectionBudget?, index: Int = 0) {
        self.fd = fd
        self.rule = rule
        self.budget = budget
        self.index = index
    }
}
