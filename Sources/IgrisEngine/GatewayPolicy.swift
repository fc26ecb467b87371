import IgrisPolicy
import IgrisProtocols

public typealias AuthenticationOutcome = Authenticator.Outcome

/// Settings of a SOCKS5 or HTTP CONNECT listener.
public struct GatewayOptions: Sendable {
    /// Username/password required. Off only when the operator says so (`--no-auth`).
    public var requireAuthentication: Bool
    /// The whole handshake (greeting to request) must arrive within this.
    public var handshakeTimeoutNanoseconds: UInt64

    public init(requireAuthentication: Bool, handshakeTimeoutNanoseconds: UInt64 = 10_000_000_000) {
        self.requireAuthentication = requireAuthentication
        self.handshakeTimeoutNanoseconds = handshakeTimeoutNanoseconds
    }
}

/// What a listener does with the connections it accepts.
public enum ListenerMode: Sendable {
    /// Bridge each connection to a fixed upstream.
    case forward(upstream: SocketAddress)
    /// Bridge each connection to a server of a pool (balanced, health-checked).
    case pool(UpstreamPool)
    /// RFC 1928 CONNECT (RFC 1929 auth), destination chosen by the client.
    case socks5(GatewayOptions)
    /// HTTP/1.1 CONNECT (Basic proxy auth), destination chosen by the client.
    case httpConnect(GatewayOptions)

    public var name: String {
        switch self {
        case .forward, .pool: return "forward"
        case .socks5: return "socks5"
        case .httpConnect: return "http_connect"
        }
    }

    var gatewayOptions: GatewayOptions? {
        switch self {
        case .forward, .pool: return nil
        case .socks5(let o), .httpConnect(let o): return o
        }
    }
}

public struct ListenerRule: Sendable {
    public var listen: SocketAddress
    public var mode: ListenerMode
    /// For logs and metrics; the listen address when not given.
    public var name: String
    /// Every connection must start with a PROXY v1/v2 header (from the load balancer in
    /// front); one without is closed. Never parsed when false.
    public var acceptProxyProtocol = false
    /// forward: send a PROXY header with the client's address to the upstream first.
    public var sendProxyProtocol: ProxyProtocol.Version?
    /// How long a forward listener that accepts PROXY headers waits for one.
    public var proxyHeaderTimeoutNanoseconds: UInt64 = 10_000_000_000
    /// Per-listener overrides of the server-wide settings (nil: the server's).
    public var splice: SpliceMode?
    public var connectTimeoutNanoseconds: UInt64?
    /// .some(nil): no idle timeout on this listener even if the server has one.
    public var idleTimeoutNanoseconds: UInt64??
    /// Connections open at once through this listener, all workers together.
    public var maxConnections: Int?

    public init(listen: SocketAddress, mode: ListenerMode, name: String? = nil) {
        self.listen = listen
        self.mode = mode
        self.name = name ?? listen.description
    }
}

/// Policy shared by every worker's SOCKS5 / HTTP CONNECT listeners: who may connect
/// (users), where to (ACL), and how names are resolved.
public final class GatewayPolicy: Sendable {
    public let acl: DestinationACL
    /// nil: no users file; listeners that require authentication refuse to start.
    public let authenticator: Authenticator?
    public let resolver: Resolver
    /// Threads for getaddrinfo and argon2id.
    public let offloadThreads: Int

    public init(acl: DestinationACL = DestinationACL(), authenticator: Authenticator? = nil,
                resolver: Resolver = Resolver(), offloadThreads: Int = 2) {
        self.acl = acl
        self.authenticator = authenticator
        self.resolver = resolver
        self.offloadThreads = offloadThreads
    }

    var accounts: [UserAccount] { authenticator?.directory.accounts ?? [] }
}

extension ListenerRule {
    /// Everything that decides how this listener treats new connections, as text: two rules
    /// with the same name and signature are the same listener across a reload.
    var signature: String {
        var parts = [listen.description, mode.name, "\(acceptProxyProtocol)", sendProxyProtocol?.rawValue ?? "-", "\(proxyHeaderTimeoutNanoseconds)",
                     splice?.rawValue ?? "-", "\(connectTimeoutNanoseconds ?? 0)", "\(String(describing: idleTimeoutNanoseconds))", "\(maxConnections ?? 0)"]
        switch mode {
        case .forward(let upstream): parts.append(upstream.description)
        case .pool(let pool): parts.append(pool.signature)
        case .socks5(let o), .httpConnect(let o): parts += ["\(o.requireAuthentication)", "\(o.handshakeTimeoutNanoseconds)"]
        }
        return parts.joined(separator: "|")
    }
}

extension UpstreamPool {
    var signature: String {
        let check = healthCheck.map { "\($0.intervalNanoseconds),\($0.timeoutNanoseconds),\($0.rise),\($0.fall)" } ?? "-"
        return "\(name);\(servers.map(\.description).joined(separator: ","));\(balance.rawValue);\(check);\(sendProxyProtocol?.rawValue ?? "-")"
    }
}
