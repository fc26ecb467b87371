import Glibc
import CURing
import IgrisPolicy
import Logging
import IgrisProtocols

enum GatewayProtocol: Sendable {
    case socks5
    case httpConnect
    /// A forward listener reading its balancer's PROXY header before connecting upstream.
    case forward
}

/// A SOCKS5 / HTTP CONNECT connection's state while it negotiates, held beside the slot
/// (slots stay small for the idle bridges they mostly are) and reused once it bridges.
struct HandshakeSession {
    static let httpHeadLimit = 8192

    var kind: GatewayProtocol = .socks5
    var options = GatewayOptions(requireAuthentication: true)
    var socks = Socks5ServerHandshake()
    var http = HTTPHeadParser(limit: httpHeadLimit)
    var client = IPAddress(high: 0, low: 0)
    var clientText = ""
    /// Authenticated account, until the connection takes one of its connection slots.
    var user: Int32 = -1
    /// HTTP: the CONNECT request waiting for its credentials to be verified.
    var pendingHost = ""
    var pendingPort: UInt16 = 0
    /// What the client asked for, for logs.
    var destination = ""
    var candidates: [SocketAddress] = []
    var nextCandidate = 0
    var lastConnectError: Int32 = 0
    var awaitingOffload = false
    /// accept_proxy_protocol: the header comes first.
    var expectProxyHeader = false
    var proxy = ProxyProtocol.Parser()
    /// What the PROXY header said (nil: a LOCAL header, or none expected).
    var proxiedSource: ProxyProtocol.Endpoint?
    var proxiedDestination: ProxyProtocol.Endpoint?
}

/// What the handshake does after a message.
enum HandshakeStep {
    /// Keep reading.
    case read
    /// Something was handed off (a name to resolve, a password to check, a connect): wait.
    case wait
    /// A failure reply was sent: close.
    case close
    /// A forward listener has its PROXY header: connect the upstream.
    case connectForward
}

extension Worker {
    // MARK: - Sessions

    func startHandshake(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, protocol kind: GatewayProtocol, options: GatewayOptions,
                        proxyHeader: Bool) {
        let h: Int32
        if let free = freeSessions.popLast() {
            h = free
        } else {
            h = Int32(sessions.count)
            sessions.append(HandshakeSession())
            sessionAddresses.append(.allocate(capacity: 1))
        }
        sessions[Int(h)] = HandshakeSession(kind: kind, options: options)
        sessions[Int(h)].expectProxyHeader = proxyHeader
        if let peer = try? Syscall.peerAddress(p.pointee.client) {
            sessions[Int(h)].client = peer.ipAddress
            sessions[Int(h)].clientText = peer.description
        }
        p.pointee.session = h
        p.pointee.state = .handshake
        wheel.schedule(s, deadline: now + options.handshakeTimeoutNanoseconds, table: table)
        // Clients send their greeting right after connecting, so it has often arrived by the
        // time the accept is handled: look now, and poll only if nothing is there yet.
        onHandshakeReadable(s, p, 0)
    }

    func releaseSession(_ p: UnsafeMutablePointer<ConnectionSlot>) {
        let h = Int(p.pointee.session)
        sessions[h] = HandshakeSession()
        freeSessions.append(Int32(h))
        p.pointee.session = -1
    }

    func armHandshakeRead(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        p.pointee.inflight += 1
        backend.pollReadable(fd: p.pointee.client, token: token(s, .handshakeReadable))
    }

    // MARK: - Reading the handshake

    /// The client's bytes are peeked, fed to the codec message by message, and only what
    /// the codec took is then read off the socket: whatever follows the request (a client
    /// that sends data before the reply) stays queued for the bridge.
    func onHandshakeReadable(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ result: Int32) {
        guard p.pointee.state == .handshake, p.pointee.session >= 0 else { return }
        if result < 0 { closeSlot(s, abort: false); return }
        let n = Syscall.peek(p.pointee.client, scratch, scratchSize)
        if n == 0 { closeSlot(s, abort: false); return }  // the client gave up
        if n < 0 {
            if n == -Int(EAGAIN) { armHandshakeRead(s, p) } else { closeSlot(s, abort: true) }
            return
        }
        var offset = 0
        var step = HandshakeStep.read
        while offset < n && step == .read {
            let bytes = UnsafeRawBufferPointer(start: scratch + offset, count: n - offset)
            let (consumed, next): (Int, HandshakeStep)
            if sessions[Int(p.pointee.session)].expectProxyHeader {
                (consumed, next) = feedProxyHeader(s, p, bytes)
            } else {
                switch sessions[Int(p.pointee.session)].kind {
                case .socks5: (consumed, next) = feedSocks5(s, p, bytes)
                case .httpConnect: (consumed, next) = feedHTTP(s, p, bytes)
                case .forward: (consumed, next) = (0, .connectForward)
                }
            }
            offset += consumed
            step = next
        }
        // Take what was parsed (it is queued: this cannot block or come up short).
        _ = Syscall.recv(p.pointee.client, scratch, offset)
        switch step {
        case .read: armHandshakeRead(s, p)
        case .wait: break
        case .close: closeAfterReply(s, p)
        case .connectForward: beginForwardConnect(s, p)
        }
    }

    /// accept_proxy_protocol: the balancer's header names the real client (used for logs,
    /// the auth failure limit and a PROXY header sent onwards). Strict: no valid header, no
    /// connection.
    private func feedProxyHeader(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ bytes: UnsafeRawBufferPointer) -> (Int, HandshakeStep) {
        let h = Int(p.pointee.session)
        let (consumed, event) = sessions[h].proxy.feed(bytes)
        switch event {
        case .needMore:
            return (consumed, .read)
        case .header(let header):
            sessions[h].expectProxyHeader = false
            if case .proxied(let source, let destination) = header {
                sessions[h].proxiedSource = source
                sessions[h].proxiedDestination = destination
                let address = SocketAddress(endpoint: source)
                sessions[h].client = address.ipAddress
                sessions[h].clientText = address.description
            }
            return (consumed, sessions[h].kind == .forward ? .connectForward : .read)
        case .failure(let failure):
            statistics.add(.proxyHeaderRejected)
            logger.info("connection without a valid PROXY header closed", metadata: [
                "listener": "\(listeners[Int(p.pointee.listener)].name)", "client": "\(sessions[h].clientText)", "error": "\(failure)",
            ])
            return (consumed, .close)
        }
    }

    /// A forward connection whose PROXY header has arrived: connect its upstream.
    private func beginForwardConnect(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        p.pointee.state = .connecting
        p.pointee.lastActivity = now
        wheel.cancel(s, table: table)
        wheel.schedule(s, deadline: now + listeners[Int(p.pointee.listener)].connectTimeoutNanoseconds, table: table)
        if !connectUpstream(s) {
            // Out of descriptors: this one does not wait (see startBridge for the one that may).
            statistics.add(.rejectedAtCapacity)
            closeSlot(s, abort: false, reason: .capacity)
        }
    }

    /// The PROXY header for an upstream: the balancer's view when one told us, else this
    /// connection's own peer and local address. Sent first on the fresh upstream socket.
    func sendProxyHeader(_ p: UnsafeMutablePointer<ConnectionSlot>) -> Bool {
        let l = listeners[Int(p.pointee.listener)]
        guard let version = l.pool?.sendProxyProtocol ?? l.sendProxyProtocol else { return true }
        var header = ProxyProtocol.Header.local
        if p.pointee.session >= 0, let source = sessions[Int(p.pointee.session)].proxiedSource,
           let destination = sessions[Int(p.pointee.session)].proxiedDestination {
            header = .proxied(source: source, destination: destination)
        } else if let peer = try? Syscall.peerAddress(p.pointee.client), let local = try? Syscall.localAddress(p.pointee.client) {
            header = .proxied(source: ProxyProtocol.Endpoint(peer), destination: ProxyProtocol.Endpoint(local))
        }
        let bytes = ProxyProtocol.encode(header, version: version)
        return bytes.withUnsafeBytes { Syscall.send(p.pointee.upstream, $0.baseAddress!, $0.count) } == bytes.count
    }

    private func feedSocks5(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ bytes: UnsafeRawBufferPointer) -> (Int, HandshakeStep) {
        let h = Int(p.pointee.session)
        let (consumed, event) = sessions[h].socks.feed(bytes)
        switch event {
        case .needMore:
            return (consumed, .read)
        case .greeting(let methods):
            let method: Socks5.Method
            if sessions[h].options.requireAuthentication {
                method = methods.contains(Socks5.Method.usernamePassword.rawValue) ? .usernamePassword : .noAcceptableMethods
            } else {
                method = methods.contains(Socks5.Method.noAuthentication.rawValue) ? .noAuthentication : .noAcceptableMethods
            }
            sessions[h].socks.select(method)
            sendReply(p, Socks5.methodSelection(method))
            if method == .noAcceptableMethods {
                handshakeFailed(p, "no acceptable authentication method", offered: methods.description)
                return (consumed, .close)
            }
            return (consumed, .read)
        case .credentials(let username, let password):
            submitAuthentication(s, p, username: username, password: password)
            return (consumed, .wait)
        case .request(let request):
            let host: String
            switch request.address {
            case .ipv4, .ipv6: host = request.address.description.trimmingCharacters(in: "[]")
            case .domain(let name): host = name
            }
            return (consumed, route(s, p, host: host, port: request.port))
        case .failure(let failure):
            sendReply(p, failure.reply)
            handshakeFailed(p, "malformed SOCKS5 handshake", offered: "\(failure)")
            return (consumed, .close)
        }
    }

    private func feedHTTP(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ bytes: UnsafeRawBufferPointer) -> (Int, HandshakeStep) {
        let h = Int(p.pointee.session)
        let (consumed, event) = sessions[h].http.feed(bytes)
        switch event {
        case .needMore:
            return (consumed, .read)
        case .failure(let error):
            sendReply(p, HTTPConnect.response(.badRequest))
            handshakeFailed(p, "malformed HTTP request head", offered: "\(error)")
            return (consumed, .close)
        case .head(let head):
            switch HTTPConnect.request(from: head) {
            case .failure(let failure):
                let response = HTTPConnect.response(failure.status)
                sendReply(p, response)
                handshakeFailed(p, "unusable HTTP request", offered: "\(failure)")
                return (consumed, .close)
            case .success(let request):
                if sessions[h].options.requireAuthentication {
                    guard let credentials = request.credentials else {
                        sendReply(p, HTTPConnect.response(.proxyAuthenticationRequired))
                        statistics.add(.handshakeFailures)
                        return (consumed, .close)
                    }
                    sessions[h].pendingHost = request.host
                    sessions[h].pendingPort = request.port
                    submitAuthentication(s, p, username: credentials.username, password: credentials.password)
                    return (consumed, .wait)
                }
                return (consumed, route(s, p, host: request.host, port: request.port))
            }
        }
    }

    private func handshakeFailed(_ p: UnsafeMutablePointer<ConnectionSlot>, _ what: String, offered: String) {
        statistics.add(.handshakeFailures)
        logger.debug("\(what)", metadata: ["client": "\(sessions[Int(p.pointee.session)].clientText)", "detail": "\(offered)"])
    }

    // MARK: - Offloaded work

    private func submitAuthentication(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, username: [UInt8], password: [UInt8]) {
        let h = Int(p.pointee.session)
        guard let authenticator = policy?.authenticator, let offload else {
            failHandshake(s, p, socks: .generalFailure, http: .badGateway)
            return
        }
        sessions[h].awaitingOffload = true
        let slot = s
        let generation = p.pointee.generation
        let client = sessions[h].client
        let mailbox = mailbox
        offload.submit {
            let outcome = authenticator.verify(username: username, password: password, client: client, now: Syscall.monotonicNanoseconds())
            mailbox.post(OffloadResult(slot: slot, generation: generation, payload: .authenticated(outcome)))
        }
    }

    /// An IP literal goes straight to the ACL; a name is resolved off the worker first.
    private func route(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, host: String, port: UInt16) -> HandshakeStep {
        let h = Int(p.pointee.session)
        sessions[h].destination = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        if let literal = IPAddress(Substring(host)) {
            sessions[h].candidates = [SocketAddress(ip: literal, port: port)]
            return beginConnecting(s, p)
        }
        guard let resolver = policy?.resolver, let offload else {
            return replyFailure(p, socks: .hostUnreachable, http: .badGateway)
        }
        sessions[h].awaitingOffload = true
        let slot = s
        let generation = p.pointee.generation
        let mailbox = mailbox
        offload.submit {
            let answer = resolver.resolve(host, port: port)
            mailbox.post(OffloadResult(slot: slot, generation: generation, payload: .resolved(answer)))
        }
        return .wait
    }

    func handleOffloadResults() {
        mailbox.take(into: &offloadResults)
        guard !offloadResults.isEmpty else { return }
        for r in offloadResults {
            guard Int(r.slot) < table.capacity, r.slot < table.used else { continue }
            let p = table.pointer(r.slot)
            // The connection may have timed out or closed while its answer was computed.
            guard p.pointee.generation == r.generation, p.pointee.state == .handshake, p.pointee.session >= 0,
                  sessions[Int(p.pointee.session)].awaitingOffload else { continue }
            let h = Int(p.pointee.session)
            sessions[h].awaitingOffload = false
            switch r.payload {
            case .authenticated(let outcome):
                authenticated(r.slot, p, outcome)
            case .resolved(.success(let addresses)):
                sessions[h].candidates = addresses
                if beginConnecting(r.slot, p) == .close { closeAfterReply(r.slot, p) }
            case .resolved(.failure(let failure)):
                statistics.add(.resolveFailures)
                logger.debug("name resolution failed", metadata: [
                    "client": "\(sessions[h].clientText)", "destination": "\(sessions[h].destination)", "error": "\(failure)",
                ])
                failHandshake(r.slot, p, socks: .hostUnreachable, http: .badGateway)
            }
        }
        offloadResults.removeAll(keepingCapacity: true)
    }

    private func authenticated(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ outcome: AuthenticationOutcome) {
        let h = Int(p.pointee.session)
        switch outcome {
        case .accepted(let index):
            sessions[h].user = Int32(index)
            switch sessions[h].kind {
            case .socks5:
                sessions[h].socks.authenticated()
                sendReply(p, Socks5.authenticationStatus(succeeded: true))
                armHandshakeRead(s, p)
            case .httpConnect:
                if route(s, p, host: sessions[h].pendingHost, port: sessions[h].pendingPort) == .close { closeAfterReply(s, p) }
            case .forward:
                break
            }
        case .rejected(let why):
            statistics.add(.authFailures)
            // Never the password: who, from where, why.
            logger.warning("authentication failed", metadata: [
                "listener": "\(listeners[Int(p.pointee.listener)].name)", "client": "\(sessions[h].clientText)", "reason": "\(why.rawValue)",
            ])
            switch sessions[h].kind {
            case .socks5: sendReply(p, Socks5.authenticationStatus(succeeded: false))
            case .httpConnect: sendReply(p, HTTPConnect.response(.proxyAuthenticationRequired))
            case .forward: break
            }
            closeAfterReply(s, p)
        }
    }

    // MARK: - Connecting

    /// ACL on every resolved address, the user's connection limit, then the first connect.
    private func beginConnecting(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) -> HandshakeStep {
        let h = Int(p.pointee.session)
        let acl = policy?.acl ?? DestinationACL()
        let asked = sessions[h].candidates
        sessions[h].candidates = asked.filter { acl.permits($0.ipAddress, port: $0.port) }
        if sessions[h].candidates.isEmpty {
            statistics.add(.aclDenied)
            logger.info("destination denied by ACL", metadata: [
                "client": "\(sessions[h].clientText)", "destination": "\(sessions[h].destination)",
                "addresses": "\(asked.map(\.description).joined(separator: ","))",
            ])
            return replyFailure(p, socks: .notAllowedByRuleset, http: .forbidden)
        }
        let user = sessions[h].user
        if user >= 0 {
            let account = accounts[Int(user)]
            guard account.tryAcquireConnection() else {
                statistics.add(.userLimitRejections)
                logger.info("user at max_connections", metadata: ["user": "\(account.name)", "client": "\(sessions[h].clientText)"])
                return replyFailure(p, socks: .notAllowedByRuleset, http: .tooManyRequests)
            }
            p.pointee.user = user
            p.pointee.rateLimited = account.isRateLimited
        }
        p.pointee.state = .connecting
        p.pointee.lastActivity = now  // connect latency is measured from here
        wheel.cancel(s, table: table)
        wheel.schedule(s, deadline: now + listeners[Int(p.pointee.listener)].connectTimeoutNanoseconds, table: table)
        return connectNextCandidate(s, p)
    }

    private func connectNextCandidate(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) -> HandshakeStep {
        let h = Int(p.pointee.session)
        while sessions[h].nextCandidate < sessions[h].candidates.count {
            let address = sessions[h].candidates[sessions[h].nextCandidate]
            sessions[h].nextCandidate += 1
            let type = Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue)
            let fd: Int32
            do throws(SyscallError) {
                fd = try Syscall.socket(family: address.family, type: type)
            } catch {
                sessions[h].lastConnectError = error.errno
                if error.errno == EMFILE || error.errno == ENFILE { pauseAccepting(errno: error.errno) }
                continue
            }
            p.pointee.upstream = fd
            _ = try? Syscall.setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
            p.pointee.inflight += 1
            // io_uring reads the address when the SQE is submitted, at the next loop turn:
            // it must outlive this call, so it lives in the session's own storage.
            let stable = sessionAddresses[h]
            stable.initialize(to: address.storage)
            stable.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                backend.connect(fd: fd, address: $0, length: address.length, token: token(s, .connect))
            }
            return .wait
        }
        statistics.add(.connectFailures)
        let e = sessions[h].lastConnectError
        logger.debug("destination connect failed", metadata: [
            "client": "\(sessions[h].clientText)", "destination": "\(sessions[h].destination)", "error": "\(Errno.describe(e))",
        ])
        let socks: Socks5.Reply
        switch e {
        case ECONNREFUSED: socks = .connectionRefused
        case ENETUNREACH, ENETDOWN: socks = .networkUnreachable
        case EHOSTUNREACH, EHOSTDOWN: socks = .hostUnreachable
        case ETIMEDOUT: socks = .ttlExpired
        default: socks = .generalFailure
        }
        return replyFailure(p, socks: socks, http: e == ETIMEDOUT ? .gatewayTimeout : .badGateway)
    }

    /// The connect completed. Returns true when the bridge should start (success reply sent).
    func gatewayConnected(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ result: Int32) -> Bool {
        let h = Int(p.pointee.session)
        if sessions[h].kind == .forward {
            guard result >= 0 else {
                forwardConnectFailed(s, p, errno: -result)
                return false
            }
            return true
        }
        if result < 0 {
            // Closed through the backend (the epoll backend keeps per-descriptor state that a
            // bare close() would leave stale for the next socket with the same number).
            sessions[h].lastConnectError = -result
            p.pointee.inflight += 1
            backend.cancelAndClose(fd: p.pointee.upstream, token: token(s, .closeUpstream))
            p.pointee.upstream = -1
            if connectNextCandidate(s, p) == .close { closeAfterReply(s, p) }
            return false
        }
        switch sessions[h].kind {
        case .socks5:
            var bound = Socks5.Address.ipv4(0, 0, 0, 0)
            var port: UInt16 = 0
            if let local = try? Syscall.localAddress(p.pointee.upstream) {
                bound = Socks5.Address(local.ipAddress)
                port = local.port
            }
            sendReply(p, Socks5.reply(.succeeded, bound: bound, port: port))
        case .httpConnect:
            sendReply(p, HTTPConnect.response(.established))
        case .forward:
            break
        }
        statistics.add(.handshakesCompleted)
        if accessLogger != nil { accessInfo[s] = (sessions[h].clientText, "\(sessions[h].destination) (\(sessions[h].candidates[sessions[h].nextCandidate - 1]))") }
        return true
    }

    func gatewayConnectTimedOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        logger.debug("destination connect timed out", metadata: [
            "client": "\(sessions[Int(p.pointee.session)].clientText)", "destination": "\(sessions[Int(p.pointee.session)].destination)",
        ])
        _ = replyFailure(p, socks: .ttlExpired, http: .gatewayTimeout)
        p.pointee.closeReason = .connectTimeout
        closeAfterReply(s, p)
    }

    // MARK: - Replies

    private func replyFailure(_ p: UnsafeMutablePointer<ConnectionSlot>, socks: Socks5.Reply, http: HTTPConnect.Status) -> HandshakeStep {
        switch sessions[Int(p.pointee.session)].kind {
        case .socks5: sendReply(p, Socks5.reply(socks))
        case .httpConnect: sendReply(p, HTTPConnect.response(http))
        case .forward: break
        }
        return .close
    }

    private func failHandshake(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, socks: Socks5.Reply, http: HTTPConnect.Status) {
        _ = replyFailure(p, socks: socks, http: http)
        closeAfterReply(s, p)
    }

    /// Replies are a few hundred bytes at most, the first the socket sends: its send buffer
    /// takes them whole, so a plain non-blocking send is enough (a failure means the client
    /// is gone, and the next read or the close finds out).
    private func sendReply(_ p: UnsafeMutablePointer<ConnectionSlot>, _ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Syscall.send(p.pointee.client, $0.baseAddress!, $0.count) }
    }

    /// Closes after a failure reply with a FIN, not a reset: unread input would make
    /// close() send RST, which can destroy the reply before the client reads it.
    func closeAfterReply(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        var drained = 0
        while drained < 65536 {
            let n = Glibc.recv(p.pointee.client, scratch, scratchSize, Int32(MSG_DONTWAIT))
            if n <= 0 { break }
            drained += n
        }
        _ = Syscall.shutdown(p.pointee.client, Int32(SHUT_WR))
        closeSlot(s, abort: false, reason: p.pointee.state == .connecting ? .connectFailed : .refused)
    }

    // MARK: - Per-user accounting and bandwidth

    /// Counts a user's bytes; for a rate-limited user, charges the direction's bucket and
    /// returns true when its recv side must pause (the wheel wakes it).
    @inline(__always)
    func accountBytes(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ n: Int) -> Bool {
        let account = accounts[Int(p.pointee.user)]
        if d == 0 { account.addBytes(toDestination: n) } else { account.addBytes(toClient: n) }
        guard let limiter = d == 0 ? account.upload : account.download else { return false }
        let wait = limiter.charge(n, now: now)
        guard wait > 0 else { return false }
        direction(p, d).pointee.throttledUntil = now + wait
        statistics.add(.throttlePauses)
        scheduleBridgeTimer(s, p)
        return true
    }

    /// Re-arms the recv of directions whose pause is over.
    func resumeThrottled(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        for d in 0..<2 {
            let dir = direction(p, d)
            guard dir.pointee.throttledUntil != 0, dir.pointee.throttledUntil <= now else { continue }
            dir.pointee.throttledUntil = 0
            // With a buffer still queued, the send completion re-arms the recv.
            if !dir.pointee.recvArmed && !dir.pointee.readEOF && !dir.pointee.waitingForBuffer
                && dir.pointee.queuedBuffer == Direction.noBuffer {
                armRecv(s, p, d)
            }
        }
    }

    /// A bridge's one timer: the earliest of its idle deadline and its throttle pauses.
    func scheduleBridgeTimer(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        var deadline = UInt64.max
        if let idle = listeners[Int(p.pointee.listener)].idleTimeoutNanoseconds { deadline = p.pointee.lastActivity + idle }
        if p.pointee.toUpstream.throttledUntil != 0 { deadline = min(deadline, p.pointee.toUpstream.throttledUntil) }
        if p.pointee.toClient.throttledUntil != 0 { deadline = min(deadline, p.pointee.toClient.throttledUntil) }
        guard deadline != .max else { return }
        if p.pointee.timerBucket >= 0 {
            if p.pointee.timerDeadline <= deadline { return }
            wheel.cancel(s, table: table)
        }
        wheel.schedule(s, deadline: deadline, table: table)
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

extension ProxyProtocol.Endpoint {
    /// IPv4 (also IPv4-mapped IPv6) as 4 bytes, IPv6 as 16.
    init(_ address: SocketAddress) {
        let ip = address.ipAddress
        if ip.isIPv4Mapped {
            let v = UInt32(truncatingIfNeeded: ip.low)
            self.init(address: [UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)], port: address.port)
        } else {
            var bytes: [UInt8] = []
            for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: ip.high >> (56 - 8 * UInt64(i)))) }
            for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: ip.low >> (56 - 8 * UInt64(i)))) }
            self.init(address: bytes, port: address.port)
        }
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

extension Worker {
    /// The access log line of a connection being released: listener, client, destination,
    /// user, bytes each way, duration, why it closed. logfmt keys; values never hold secrets.
    func logAccess(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ log: Logger) {
        var client = "-"
        var destination = "-"
        if let info = accessInfo.removeValue(forKey: s) {
            client = info.client
            destination = info.destination
        }
        if p.pointee.server >= 0 { destination = serverName(p) }
        if p.pointee.session >= 0 {
            let h = Int(p.pointee.session)
            // Still in the handshake: what the session knows (the balancer's client, if any).
            if !sessions[h].clientText.isEmpty { client = sessions[h].clientText }
            if !sessions[h].destination.isEmpty { destination = sessions[h].destination }
        }
        var user = "-"
        if p.pointee.user >= 0 {
            user = accounts[Int(p.pointee.user)].name
        } else if p.pointee.session >= 0, sessions[Int(p.pointee.session)].user >= 0 {
            user = accounts[Int(sessions[Int(p.pointee.session)].user)].name
        }
        let duration = Double(now &- p.pointee.openedAt) / 1e9
        log.info("closed", metadata: [
            "listener": "\(listeners[Int(p.pointee.listener)].name)",
            "client": "\(client)",
            "destination": "\(destination)",
            "user": "\(user)",
            "bytes_up": "\(p.pointee.toUpstream.bytes)",
            "bytes_down": "\(p.pointee.toClient.bytes)",
            "duration": "\((duration * 1000).rounded() / 1000)s",
            "reason": "\(p.pointee.closeReason.text)",
        ])
    }
}
