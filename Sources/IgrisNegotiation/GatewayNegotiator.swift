import Glibc
import IgrisEngine
import IgrisPolicy
import IgrisProtocols
import Logging
import Synchronization

/// A listener's negotiation: SOCKS5 or HTTP CONNECT (each optionally behind a balancer's
/// PROXY header), or a PROXY header alone before a plain forward.
final class GatewayNegotiator: NegotiatorFactory {
    enum Kind: String, Sendable {
        case socks5
        case httpConnect = "http_connect"
        /// A forward listener reading its balancer's PROXY header before connecting its pool.
        case proxyHeaderOnly = "proxy_header"
    }

    let kind: Kind
    let options: GatewayOptions
    let acceptProxyProtocol: Bool
    let gateway: Gateway

    /// The balancers whose PROXY headers are believed (nil: any peer's).
    let trustedProxies: [CIDR]?

    init(protocol kind: Kind, options: GatewayOptions, acceptProxyProtocol: Bool, trustedProxies: [CIDR]? = nil, gateway: Gateway) {
        self.trustedProxies = trustedProxies
        self.kind = kind
        self.options = options
        self.acceptProxyProtocol = acceptProxyProtocol
        self.gateway = gateway
    }

    var name: String { kind.rawValue }
    var signature: String {
        "\(options.requireAuthentication),\(options.handshakeTimeoutNanoseconds),\(acceptProxyProtocol),\(trustedProxies?.map(\.description) ?? [])"
    }
    var timeoutNanoseconds: UInt64 { options.handshakeTimeoutNanoseconds }

    func makeNegotiation(_ context: NegotiationContext) -> any Negotiation {
        GatewayNegotiation(factory: self, context: context)
    }
}

/// What an offload thread hands back to a negotiation.
enum OffloadAnswer: Sendable {
    case authenticated(Authenticator.Outcome)
    /// The name asked (for a UDP association's held datagrams) and its answer.
    case resolved(String, Result<[SocketAddress], ResolveFailure>)
}

/// Whether a negotiation's connection is still open, for work queued on other threads.
final class OpenFlag: Sendable {
    private let cell = Atomic<Bool>(true)
    var value: Bool {
        get { cell.load(ordering: .relaxed) }
        set { cell.store(newValue, ordering: .relaxed) }
    }
}

/// One connection's negotiation. Parsing is the IgrisProtocols codecs'; this decides: which
/// method, who the user is (argon2id off the worker), where to (name resolved off the
/// worker, every address through the ACL, the user's connection limit), and which reply.
final class GatewayNegotiation: Negotiation {
    static let httpHeadLimit = 8192

    let factory: GatewayNegotiator
    let context: NegotiationContext
    /// The policy as it was when the connection arrived (a reload changes later ones).
    let policy: GatewayPolicy
    var socks = Socks5ServerHandshake()
    var http = HTTPHeadParser(limit: GatewayNegotiation.httpHeadLimit)
    var proxy = ProxyProtocol.Parser()
    var expectProxyHeader: Bool
    var client: IPAddress
    var clientDescription: String
    var destinationDescription = ""
    var proxied: (source: SocketAddress, destination: SocketAddress)?
    /// Authenticated account; the engine takes it over at the first connect.
    var account: Int32 = -1
    /// The user name a client tried, quoted and escaped for the log (control characters such
    /// as CR and LF can't split a log line).
    var triedUser = "-"
    /// HTTP: the CONNECT request waiting for its credentials to be verified.
    var pendingHost = ""
    var pendingPort: UInt16 = 0
    /// HTTP: a plain request to forward once connected (nil: CONNECT).
    var pendingForward: HTTPForward.Request?
    var candidates: [SocketAddress] = []
    var nextCandidate = 0
    var lastConnectError: Int32 = 0
    /// SOCKS5 UDP ASSOCIATE: the association's destinations and held datagrams.
    var udp: DatagramRelayState?
    /// False once the connection has closed: queued work for it is skipped.
    let connectionOpen = OpenFlag()

    init(factory: GatewayNegotiator, context: NegotiationContext) {
        self.factory = factory
        self.context = context
        policy = factory.gateway.policy
        expectProxyHeader = factory.acceptProxyProtocol
        client = context.client?.ipAddress ?? IPAddress(high: 0, low: 0)
        clientDescription = context.client?.description ?? "-"
    }

    /// The engine drops a negotiation when its connection closes.
    deinit { connectionOpen.value = false }

    var statistics: WorkerStatistics { context.statistics }

    func received(_ bytes: UnsafeRawBufferPointer) -> (consumed: Int, action: NegotiationAction) {
        if expectProxyHeader { return feedProxyHeader(bytes) }
        switch factory.kind {
        case .socks5: return feedSocks5(bytes)
        case .httpConnect: return feedHTTP(bytes)
        case .proxyHeaderOnly: return (0, NegotiationAction(.connectListenerPool))
        }
    }

    /// accept_proxy_protocol: the balancer's header names the real client (used for logs,
    /// the auth failure limit and a PROXY header sent onwards). Strict: no valid header, no
    /// connection.
    private func feedProxyHeader(_ bytes: UnsafeRawBufferPointer) -> (Int, NegotiationAction) {
        let (consumed, event) = proxy.feed(bytes)
        switch event {
        case .needMore:
            return (consumed, .read)
        case .header(let header):
            expectProxyHeader = false
            if let trusted = factory.trustedProxies, let peer = context.client?.ipAddress, !trusted.contains(where: { $0.contains(peer) }) {
                // Anyone who reaches the listener directly could name any client: only the
                // balancers' headers count.
                statistics.add(.proxyHeaderRejected)
                context.logger.warning("PROXY header from an untrusted peer refused (not in proxy_protocol_from)", metadata: [
                    "listener": "\(context.listener)", "peer": "\(context.client?.description ?? "-")",
                ])
                return (consumed, NegotiationAction(.close(.refused)))
            }
            if case .proxied(let source, let destination) = header {
                let address = SocketAddress(endpoint: source)
                proxied = (address, SocketAddress(endpoint: destination))
                client = address.ipAddress
                clientDescription = address.description
            }
            return (consumed, factory.kind == .proxyHeaderOnly ? NegotiationAction(.connectListenerPool) : .read)
        case .failure(let failure):
            statistics.add(.proxyHeaderRejected)
            context.logger.info("connection without a valid PROXY header closed", metadata: [
                "listener": "\(context.listener)", "client": "\(clientDescription)", "error": "\(failure)",
            ])
            return (consumed, NegotiationAction(.close(.refused)))
        }
    }

    private func feedSocks5(_ bytes: UnsafeRawBufferPointer) -> (Int, NegotiationAction) {
        let (consumed, event) = socks.feed(bytes)
        switch event {
        case .needMore:
            return (consumed, .read)
        case .greeting(let methods):
            let method: Socks5.Method
            if context.authenticatedAccount >= 0 && methods.contains(Socks5.Method.noAuthentication.rawValue) {
                method = .noAuthentication  // a client certificate named the user
            } else if factory.options.requireAuthentication {
                method = methods.contains(Socks5.Method.usernamePassword.rawValue) ? .usernamePassword : .noAcceptableMethods
            } else {
                method = methods.contains(Socks5.Method.noAuthentication.rawValue) ? .noAuthentication : .noAcceptableMethods
            }
            socks.select(method)
            if method == .noAcceptableMethods {
                failed("no acceptable authentication method", detail: methods.description)
                return (consumed, NegotiationAction(reply: Socks5.methodSelection(method), .close(.refused)))
            }
            return (consumed, NegotiationAction(reply: Socks5.methodSelection(method), .read))
        case .credentials(let username, let password):
            return (consumed, authenticate(username: username, password: password))
        case .request(let request) where request.command == .udpAssociate:
            return (consumed, associate(request))
        case .request(let request):
            let host: String
            switch request.address {
            case .ipv4, .ipv6: host = request.address.description.trimmingCharacters(in: "[]")
            case .domain(let name): host = name
            }
            return (consumed, route(host: host, port: request.port))
        case .failure(let failure):
            failed("malformed SOCKS5 handshake", detail: "\(failure)")
            return (consumed, NegotiationAction(reply: failure.reply, .close(.refused)))
        }
    }

    private func feedHTTP(_ bytes: UnsafeRawBufferPointer) -> (Int, NegotiationAction) {
        let (consumed, event) = http.feed(bytes)
        switch event {
        case .needMore:
            return (consumed, .read)
        case .failure(let error):
            failed("malformed HTTP request head", detail: "\(error)")
            return (consumed, NegotiationAction(reply: HTTPConnect.response(.badRequest), .close(.refused)))
        case .head(let head):
            switch HTTPConnect.request(from: head) {
            case .failure(let failure):
                failed("unusable HTTP request", detail: "\(failure)")
                return (consumed, NegotiationAction(reply: HTTPConnect.response(failure.status), .close(.refused)))
            case .success(let request):
                pendingForward = request.forward
                guard factory.options.requireAuthentication && context.authenticatedAccount < 0 else {
                    return (consumed, route(host: request.host, port: request.port))
                }
                guard let credentials = request.credentials else {
                    statistics.add(.handshakeFailures)
                    return (consumed, NegotiationAction(reply: HTTPConnect.response(.proxyAuthenticationRequired), .close(.refused)))
                }
                pendingHost = request.host
                pendingPort = request.port
                return (consumed, authenticate(username: credentials.username, password: credentials.password))
            }
        }
    }

    private func failed(_ what: String, detail: String) {
        statistics.add(.handshakeFailures)
        context.logger.debug("\(what)", metadata: ["client": "\(clientDescription)", "detail": "\(detail)"])
    }

    // MARK: - Offloaded work

    /// A lockout or a cached success is answered here; anything else waits its turn for
    /// argon2id, and is skipped if the client has gone by then.
    private func authenticate(username: [UInt8], password: [UInt8]) -> NegotiationAction {
        guard let authenticator = policy.authenticator else { return failure(socks: .generalFailure, http: .badGateway) }
        triedUser = String(decoding: username, as: UTF8.self).debugDescription
        let client = client
        if let outcome = authenticator.precheck(username: username, password: password, client: client, now: Syscall.monotonicNanoseconds()) {
            return resumed(OffloadAnswer.authenticated(outcome))
        }
        let resume = context.resume
        let open = connectionOpen
        factory.gateway.checkPassword(PasswordCheckQueue.Job(source: client.failureKey, run: {
            resume(OffloadAnswer.authenticated(
                authenticator.verifyWithKDF(username: username, password: password, client: client, now: Syscall.monotonicNanoseconds())))
        }, refuse: {
            resume(OffloadAnswer.authenticated(.rejected(.busy)))
        }, wanted: { open.value }))
        return .wait
    }

    /// An IP literal goes straight to the ACL; a name is resolved off the worker first.
    private func route(host: String, port: UInt16) -> NegotiationAction {
        destinationDescription = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        if let literal = IPAddress(Substring(host)) {
            candidates = [SocketAddress(ip: literal, port: port)]
            return beginConnecting()
        }
        let resolver = policy.resolver
        let resume = context.resume
        factory.gateway.offload {
            resume(OffloadAnswer.resolved(host, resolver.resolve(host, port: port)))
        }
        return .wait
    }

    func resumed(_ value: any Sendable) -> NegotiationAction {
        guard let answer = value as? OffloadAnswer else { return failure(socks: .generalFailure, http: .badGateway) }
        if udp != nil, case .resolved(let name, let result) = answer {
            resolvedForDatagrams(name, result)
            return .read
        }
        switch answer {
        case .authenticated(.accepted(let index)):
            // With a client certificate's user, the engine already holds that user's connection.
            account = context.authenticatedAccount >= 0 ? -1 : Int32(index)
            if factory.kind == .socks5 {
                socks.authenticated()
                return NegotiationAction(reply: Socks5.authenticationStatus(succeeded: true), .read)
            }
            return route(host: pendingHost, port: pendingPort)
        case .authenticated(.rejected(.busy)):
            statistics.add(.authBusy)
            context.logger.warning("password check refused: the queue is full", metadata: [
                "listener": "\(context.listener)", "client": "\(clientDescription)", "user": "\(triedUser)",
            ])
            let reply = factory.kind == .socks5 ? Socks5.authenticationStatus(succeeded: false) : HTTPConnect.response(.serviceUnavailable)
            return NegotiationAction(reply: reply, .close(.refused))
        case .authenticated(.rejected(let why)):
            statistics.add(.authFailures)
            // Never the password: who, from where, why.
            context.logger.warning("authentication failed", metadata: [
                "listener": "\(context.listener)", "client": "\(clientDescription)", "user": "\(triedUser)", "reason": "\(why.rawValue)",
            ])
            let reply = factory.kind == .socks5 ? Socks5.authenticationStatus(succeeded: false) : HTTPConnect.response(.proxyAuthenticationRequired)
            return NegotiationAction(reply: reply, .close(.refused))
        case .resolved(_, .success(let addresses)):
            candidates = addresses
            return beginConnecting()
        case .resolved(_, .failure(let failure)):
            statistics.add(.resolveFailures)
            context.logger.debug("name resolution failed", metadata: [
                "client": "\(clientDescription)", "destination": "\(destinationDescription)", "error": "\(failure)",
            ])
            return self.failure(socks: .hostUnreachable, http: .badGateway)
        }
    }

    // MARK: - Connecting

    /// The ACL on every resolved address, the user's connection limit, then the first connect.
    private func beginConnecting() -> NegotiationAction {
        let asked = candidates
        candidates = asked.filter { policy.acl.permits($0.ipAddress, port: $0.port) }
        if candidates.isEmpty {
            statistics.add(.aclDenied)
            context.logger.info("destination denied by ACL", metadata: [
                "client": "\(clientDescription)", "destination": "\(destinationDescription)",
                "addresses": "\(asked.map(\.description).joined(separator: ","))",
            ])
            return failure(socks: .notAllowedByRuleset, http: .forbidden)
        }
        guard holdUserConnection() else { return failure(socks: .notAllowedByRuleset, http: .tooManyRequests) }
        return connectNext()
    }

    /// Takes one of the authenticated user's connections (a tunnel, or a UDP association);
    /// false, counted and logged, at its max_connections.
    func holdUserConnection() -> Bool {
        guard account >= 0 else { return true }
        let user = policy.accounts[Int(account)]
        guard user.tryAcquireConnection() else {
            statistics.add(.userLimitRejections)
            context.logger.info("user at max_connections", metadata: ["user": "\(user.name)", "client": "\(clientDescription)"])
            account = -1  // holds none of its connections
            return false
        }
        return true
    }

    private func connectNext() -> NegotiationAction {
        if nextCandidate < candidates.count {
            nextCandidate += 1
            return NegotiationAction(.connect(candidates[nextCandidate - 1]))
        }
        statistics.add(.connectFailures)
        let e = lastConnectError
        context.logger.debug("destination connect failed", metadata: [
            "client": "\(clientDescription)", "destination": "\(destinationDescription)", "error": "\(Errno.describe(e))",
        ])
        var action = failure(socks: Self.socksReply(connectErrno: e), http: e == ETIMEDOUT ? .gatewayTimeout : .badGateway)
        action.next = .close(.connectFailed)
        return action
    }

    /// How a failed connect reads to a SOCKS5 client (RFC 1928 §6).
    static func socksReply(connectErrno e: Int32) -> Socks5.Reply {
        switch e {
        case ECONNREFUSED: return .connectionRefused
        case ENETUNREACH, ENETDOWN: return .networkUnreachable
        case EHOSTUNREACH, EHOSTDOWN: return .hostUnreachable
        case ETIMEDOUT: return .ttlExpired
        default: return .generalFailure
        }
    }

    func connected(error: Int32, local: SocketAddress?) -> NegotiationAction {
        guard error == 0 else {
            lastConnectError = error
            return connectNext()
        }
        let address = candidates[nextCandidate - 1]
        destinationDescription = "\(destinationDescription) (\(address))"
        switch factory.kind {
        case .socks5:
            let bound = local.map { Socks5.Address($0.ipAddress) } ?? .ipv4(0, 0, 0, 0)
            return NegotiationAction(reply: Socks5.reply(.succeeded, bound: bound, port: local?.port ?? 0), .bridge)
        case .httpConnect:
            guard let forward = pendingForward else { return NegotiationAction(reply: HTTPConnect.response(.established), .bridge) }
            // A plain request: its head goes to the origin; the response is the origin's.
            var action = NegotiationAction(.bridge)
            action.destinationPreamble = forward.head
            action.uploadFraming = forward.body
            return action
        case .proxyHeaderOnly:
            return NegotiationAction(.bridge)
        }
    }

    func connectTimedOut() -> [UInt8] {
        context.logger.debug("destination connect timed out", metadata: [
            "client": "\(clientDescription)", "destination": "\(destinationDescription)",
        ])
        return failure(socks: .ttlExpired, http: .gatewayTimeout).reply
    }

    /// A failure reply in the listener's protocol, then close.
    private func failure(socks: Socks5.Reply, http: HTTPConnect.Status) -> NegotiationAction {
        switch factory.kind {
        case .socks5: return NegotiationAction(reply: Socks5.reply(socks), .close(.refused))
        case .httpConnect: return NegotiationAction(reply: HTTPConnect.response(http), .close(.refused))
        case .proxyHeaderOnly: return NegotiationAction(.close(.refused))
        }
    }
}

extension Socks5.Address {
    init(_ ip: IPAddress) {
        if ip.isIPv4Mapped {
            let v = UInt32(truncatingIfNeeded: ip.low)
            self = .ipv4(UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF))
        } else {
            var bytes: [UInt8] = []
            for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: ip.high >> (56 - 8 * UInt64(i)))) }
            for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: ip.low >> (56 - 8 * UInt64(i)))) }
            self = .ipv6(bytes)
        }
    }
}

extension String {
    func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}

extension SocketAddress {
    init(endpoint: ProxyProtocol.Endpoint) {
        let ip = endpoint.address.count == 4
            ? IPAddress(ipv4: endpoint.address[0], endpoint.address[1], endpoint.address[2], endpoint.address[3])
            : IPAddress(ipv6: endpoint.address)
        self.init(ip: ip, port: endpoint.port)
    }
}
