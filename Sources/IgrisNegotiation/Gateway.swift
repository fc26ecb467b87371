import IgrisEngine
import IgrisPolicy
import IgrisProtocols

/// What a listener does with the connections it accepts: the one listener mode, from the
/// configuration file and the command line to `ListenerRule`.
public enum ListenerMode: String, Sendable, CaseIterable {
    /// Bridge each connection to an upstream (or a server of a pool).
    case forward
    /// RFC 1928 CONNECT (RFC 1929 auth), destination chosen by the client.
    case socks5
    /// HTTP/1.1 CONNECT (Basic proxy auth), destination chosen by the client.
    case httpConnect = "http_connect"
    /// Metrics and health (served by the admin endpoint, not the engine).
    case admin
}

/// Settings of a SOCKS5 or HTTP CONNECT listener's negotiation.
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

/// Who may go where: the destination ACL, the users (with their argon2id verifier) and how
/// names are resolved. Replaced as a whole on reload; the authenticator stays the same
/// object and reloads its users file in place (`Authenticator.reload`).
public struct GatewayPolicy: Sendable {
    public var acl: DestinationACL
    /// nil: no users file; listeners that require authentication refuse to start.
    public var authenticator: Authenticator?
    public var resolver: Resolver

    public init(acl: DestinationACL = DestinationACL(), authenticator: Authenticator? = nil, resolver: Resolver = Resolver()) {
        self.acl = acl
        self.authenticator = authenticator
        self.resolver = resolver
    }

    /// The users file's accounts, in the order negotiations name them.
    public var accounts: [UserAccount] { authenticator?.directory.accounts ?? [] }
}

/// A configuration error found while building listeners, with the one line an operator sees.
public struct GatewayError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// What every negotiating listener of a process shares: the current policy (a reload swaps
/// its ACL for new connections at once, kept listeners included), the resolver threads and
/// the password-check threads, each apart from the other.
public final class Gateway: Sendable {
    private let current: Locked<GatewayPolicy>
    private let offloadThreads: Int
    /// Started by the first job: a gateway that never resolves a name or checks a password
    /// (plain forwards, `igris check`) never has the threads.
    private let pool = Locked<OffloadPool?>(nil)
    private let passwordChecks = Locked<PasswordCheckQueue?>(nil)

    public init(policy: GatewayPolicy, offloadThreads: Int = 2) {
        current = Locked(policy)
        self.offloadThreads = offloadThreads
    }

    /// Runs `job` (name resolution) on a resolver thread.
    func offload(_ job: @escaping OffloadPool.Job) {
        let threads = offloadThreads
        pool.withLock { p in
            if p == nil { p = OffloadPool(threads: threads) }
            return p!
        }.submit(job)
    }

    /// Queues an argon2id check (see `PasswordCheckQueue` for its bounds).
    func checkPassword(_ job: PasswordCheckQueue.Job) {
        passwordCheckQueue.submit(job)
    }

    /// The password-check queue (started on first use).
    public var passwordCheckQueue: PasswordCheckQueue {
        let threads = offloadThreads
        return passwordChecks.withLock { q in
            if q == nil { q = PasswordCheckQueue(threads: threads) }
            return q!
        }
    }

    public var policy: GatewayPolicy { current.withLock { $0 } }

    /// SIGHUP: the new ACL for every connection negotiated from now on.
    public func update(_ policy: GatewayPolicy) { current.withLock { $0 = policy } }

    /// The password-check queue if anything has used it (metrics).
    public var startedPasswordCheckQueue: PasswordCheckQueue? { passwordChecks.withLock { $0 } }

    /// Joins the resolver and password-check threads (after the server stopped).
    public func shutdown() {
        pool.withLock { $0 }?.shutdown()
        passwordChecks.withLock { $0 }?.shutdown()
    }

    /// The engine's rule for a listener. forward: to `pool` (after a balancer's PROXY header
    /// when `acceptProxyProtocol`); socks5 / http_connect: negotiated with `options`.
    public func rule(listen: SocketAddress, name: String? = nil, mode: ListenerMode, pool: UpstreamPool? = nil,
                     options: GatewayOptions = GatewayOptions(requireAuthentication: true),
                     acceptProxyProtocol: Bool = false, trustedProxies: [CIDR]? = nil) throws(GatewayError) -> ListenerRule {
        let label = name ?? listen.description
        switch mode {
        case .forward:
            guard let pool else { throw GatewayError(description: "forward listener \(label) has no upstream") }
            var rule = ListenerRule(listen: listen, name: label, pool: pool)
            if acceptProxyProtocol {
                rule.negotiator = GatewayNegotiator(protocol: .proxyHeaderOnly, options: options, acceptProxyProtocol: true,
                                                    trustedProxies: trustedProxies, gateway: self)
                rule.sourceLimitsExempt = trustedProxies ?? []
            }
            return rule
        case .socks5, .httpConnect:
            if options.requireAuthentication && policy.authenticator == nil {
                throw GatewayError(description: "\(mode.rawValue) listener \(label) requires authentication but no users file is configured (give --users FILE, or --no-auth)")
            }
            let negotiator = GatewayNegotiator(protocol: mode == .socks5 ? .socks5 : .httpConnect, options: options,
                                               acceptProxyProtocol: acceptProxyProtocol, trustedProxies: trustedProxies, gateway: self)
            var rule = ListenerRule(listen: listen, name: label, negotiator: negotiator)
            if acceptProxyProtocol { rule.sourceLimitsExempt = trustedProxies ?? [] }
            return rule
        case .admin:
            throw GatewayError(description: "admin listener \(label) is served by the admin endpoint")
        }
    }
}
