import Glibc
import IgrisProtocols

/// Connecting the upstream side: a pool server (balanced, failing over within the connect
/// timeout) or the address a negotiation chose; the connect timeout; the PROXY header sent
/// first; and the switch to bridging.
extension Worker {
    /// Opens the upstream socket to a server of the listener's pool and starts the connect.
    /// Out of descriptors (the accept may have taken the last one — accept takes a whole
    /// burst at once), accepting pauses and the caller lets the client wait, up to its
    /// connect timeout, for a descriptor to come back. Returns false when there was none.
    func connectUpstream(_ s: Int32) -> Bool {
        let p = table.pointer(s)
        let l = listeners[Int(p.pointee.listener)]
        guard let pool = l.pool else { closeSlot(s, abort: false, reason: .connectFailed); return true }
        var hash: UInt64 = 0
        if pool.balance == .sourceHash, let ip = sourceAddress(p)?.ipAddress {
            hash = (ip.high &* 0x9E37_79B9_7F4A_7C15 ^ ip.low) &* 0xBF58_476D_1CE4_E5B9
            hash ^= hash >> 29
        }
        guard let server = pool.pick(tried: p.pointee.triedServers, clientHash: hash) else {
            statistics.add(.connectFailures)
            logger.warning("no server to connect to", metadata: ["listener": "\(l.name)", "pool": "\(pool.name)"])
            closeSlot(s, abort: false, reason: .noServer)
            return true
        }
        let upstream: Int32
        do {
            let family = pool.servers[server].family
            upstream = try Syscall.streamSocket(family: family, source: pool.source(family: family))
        } catch where error.errno == EMFILE || error.errno == ENFILE {
            pauseAccepting(errno: error.errno)
            return false
        } catch {
            statistics.add(.connectFailures)
            logger.warning("upstream socket failed", metadata: ["listener": "\(l.name)", "error": "\(error)"])
            closeSlot(s, abort: false, reason: .connectFailed)
            return true
        }
        p.pointee.server = Int16(server)
        p.pointee.triedServers |= 1 << UInt64(server)
        pool.acquire(server)
        (pool.addresses + server).withMemoryRebound(to: sockaddr.self, capacity: 1) {
            submitConnect(s, p, upstream, $0, pool.servers[server].length)
        }
        return true
    }

    /// The client's address for source_hash: the balancer's view when a PROXY header gave one.
    private func sourceAddress(_ p: UnsafeMutablePointer<ConnectionSlot>) -> SocketAddress? {
        if p.pointee.session >= 0, let proxied = negotiations[Int(p.pointee.session)]?.proxied { return proxied.source }
        return try? Syscall.peerAddress(p.pointee.client)
    }

    /// Connects to the address a negotiation chose. A socket that can't be had is reported
    /// to the negotiation as that connect's failure.
    func connectNegotiated(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, to address: SocketAddress) {
        let h = Int(p.pointee.session)
        let upstream: Int32
        do {
            upstream = try Syscall.streamSocket(family: address.family)
        } catch {
            if error.errno == EMFILE || error.errno == ENFILE { pauseAccepting(errno: error.errno) }
            perform(s, p, negotiations[h]!.connected(error: error.errno, local: nil))
            return
        }
        let stable = connectAddresses[h]
        stable.initialize(to: address.storage)
        stable.withMemoryRebound(to: sockaddr.self, capacity: 1) { submitConnect(s, p, upstream, $0, address.length) }
    }

    private func submitConnect(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ fd: Int32,
                               _ address: UnsafePointer<sockaddr>, _ length: socklen_t) {
        p.pointee.setUpstream(fd)
        _ = try? Syscall.setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
        if let timeout = listeners[Int(p.pointee.listener)].deadPeerTimeoutNanoseconds {
            _ = try? Syscall.setDeadPeerTimeout(fd, nanoseconds: timeout)
        }
        p.pointee.connectArmed = true
        p.pointee.inflight += 1
        backend.connect(fd: fd, address: address, length: length, token: token(s, .connect))
    }

    /// Closes an upstream socket whose connect (or upstream_tls handshake) failed, through the
    /// backend, which may hold state for the descriptor, cancelling `pending` on it, so
    /// another can be tried.
    private func dropUpstream(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, pending: PendingOperations = .none, abort: Bool = false) {
        p.pointee.inflight += 1
        backend.close(fd: p.pointee.upstream, pending: pending, abort: abort, token: token(s, .close, 1))
        p.pointee.setUpstream(-1)
    }

    func onConnect(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ result: Int32) {
        p.pointee.connectArmed = false
        guard p.pointee.state == .connecting else { return }
        if p.pointee.server < 0 && p.pointee.session >= 0 {
            // A destination the negotiation chose: it answers (reply, next address, refusal).
            var local: SocketAddress? = nil
            if result >= 0 { local = try? Syscall.localAddress(p.pointee.upstream) } else { dropUpstream(s, p) }
            perform(s, p, negotiations[Int(p.pointee.session)]!.connected(error: result < 0 ? -result : 0, local: local))
            return
        }
        if result < 0 {
            poolConnectFailed(s, p, errno: -result)
            return
        }
        if let tls = listeners[Int(p.pointee.listener)].pool?.tls {
            // The PROXY header goes before the handshake, in the clear.
            if !sendProxyHeader(p) { closeSlot(s, abort: true); return }
            let server = listeners[Int(p.pointee.listener)].pool!.servers[Int(p.pointee.server)]
            startClientTLS(s, p, tls, host: server.ipAddress.description)
            return
        }
        startBridging(s, p)
    }

    /// A pool connect failed: the next healthy server not yet tried gets the connection
    /// (within the same connect timeout), or the client is closed.
    private func poolConnectFailed(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, errno e: Int32) {
        statistics.add(.connectFailures)
        let l = listeners[Int(p.pointee.listener)]
        logger.warning("upstream connect failed", metadata: [
            "listener": "\(l.name)", "upstream": "\(serverName(p))", "error": "\(Errno.describe(e))",
        ])
        if hasNextServer(p) {
            switchToNextServer(s, p, pending: .none, abort: false)
            return
        }
        if p.pointee.server >= 0 {
            l.pool?.release(Int(p.pointee.server))
            p.pointee.server = -1
        }
        dropUpstream(s, p)
        closeSlot(s, abort: false, reason: .connectFailed)
    }

    /// Whether the connection's pool has a healthy server it has not tried yet.
    func hasNextServer(_ p: UnsafeMutablePointer<ConnectionSlot>) -> Bool {
        guard let pool = listeners[Int(p.pointee.listener)].pool else { return false }
        return pool.pick(tried: p.pointee.triedServers, clientHash: 0) != nil
    }

    /// The pool server failed this connection (its connect, or its upstream_tls handshake):
    /// its socket is closed (cancelling `pending` on it) and the next healthy server not yet
    /// tried gets the connection, within the same connect timeout (see `hasNextServer`).
    func switchToNextServer(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, pending: PendingOperations, abort: Bool) {
        if p.pointee.server >= 0 {
            listeners[Int(p.pointee.listener)].pool?.release(Int(p.pointee.server))
            p.pointee.server = -1
        }
        dropUpstream(s, p, pending: pending, abort: abort)
        _ = connectUpstream(s)
    }

    func connectTimedOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        if p.pointee.server < 0 && p.pointee.session >= 0 {
            let reply = negotiations[Int(p.pointee.session)]!.connectTimedOut()
            perform(s, p, NegotiationAction(reply: reply, .close(.connectTimeout)))
            return
        }
        let l = listeners[Int(p.pointee.listener)]
        logger.warning("upstream connect timed out", metadata: ["listener": "\(l.name)", "upstream": "\(serverName(p))"])
        closeSlot(s, abort: false, reason: .connectTimeout)
    }

    func serverName(_ p: UnsafeMutablePointer<ConnectionSlot>) -> String {
        guard p.pointee.server >= 0, let pool = listeners[Int(p.pointee.listener)].pool else { return "-" }
        return pool.describe(Int(p.pointee.server))
    }

    /// The upstream is connected (and any success reply sent): the PROXY header goes first,
    /// then both directions start.
    func startBridging(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, preamble: [UInt8] = []) {
        if p.pointee.tls & TLSSides.upstream == 0 && !sendProxyHeader(p) {
            closeSlot(s, abort: true)
            return
        }
        // A TLS client's bytes decrypted before now (sent right behind its handshake or
        // request) go first, after the preamble.
        guard let early = takeEarlyPlaintext(s) else {
            closeSlot(s, abort: true)
            return
        }
        if let session = clientTLS[s] { protectRecords(session) }
        // Bridging: the sessions read ciphertext where it was received (no copy).
        let readBufferLength = backend.buffers.size + Self.tlsDecryptHeadroom
        _ = clientTLS[s]?.useInPlaceInput(readBufferLength: readBufferLength)
        _ = upstreamTLS[s]?.useInPlaceInput(readBufferLength: readBufferLength)
        let first = early.isEmpty ? preamble : preamble + early
        if !first.isEmpty {
            if let session = upstreamTLS[s] {
                _ = first.withUnsafeBytes { session.write($0.baseAddress!, count: $0.count) }
                if !flushTLS(s, p, side: 1) || session.pendingOutput > 0 { closeSlot(s, abort: true); return }
            } else if first.withUnsafeBytes({ backend.sendNow(fd: p.pointee.upstream, $0) }) != first.count {
                // A fresh socket's send buffer takes a request head (8 KiB at most) whole.
                closeSlot(s, abort: true)
                return
            }
        }
        if p.pointee.session >= 0 {
            if accessLogger != nil, let n = negotiations[Int(p.pointee.session)] {
                // The client as negotiated (a balancer's PROXY header names the real one); a
                // pool's server is filled in at logging time.
                accessInfo[s] = (n.clientDescription, n.destinationDescription)
            }
            releaseNegotiation(p)
        }
        wheel.cancel(s, table: table)
        // lastActivity holds when the connect was started until the bridge is up.
        statistics.recordConnectLatency(now &- p.pointee.lastActivity)
        p.pointee.state = .bridging
        p.pointee.lastActivity = now
        if let idle = listeners[Int(p.pointee.listener)].idleTimeoutNanoseconds {
            wheel.schedule(s, deadline: now + idle, table: table)
        }
        // A rate-limited user's bytes must pass through user space to be paced, and TLS's to
        // be encrypted or decrypted.
        if p.pointee.tls & TLSSides.sessions != 0 { p.pointee.splice = .never }
        if backend.directCapacity > 0 && p.pointee.tls == 0 { moveToDirectDescriptors(p) }
        let path: Direction.Path = p.pointee.splice == .always && !p.pointee.rateLimited ? .splice : .copy
        // A framed upload's bytes must be seen to find where its body ends.
        p.pointee.toUpstream.path = p.pointee.framedUpload ? .copy : path
        p.pointee.toClient.path = path
        armReadSide(s, p, 0)
        armReadSide(s, p, 1)
    }

    /// `direct_descriptors`: the bridge's sockets leave the process's descriptor table for the
    /// ring's, so bridges are not bounded by RLIMIT_NOFILE. Everything that needs a syscall on
    /// them (PROXY header, preamble, TLS, negotiation) is done by now; what is left is the ring's
    /// own operations, on the copy path (splice(2) needs descriptors). A full table leaves the
    /// connection as it was.
    private func moveToDirectDescriptors(_ p: UnsafeMutablePointer<ConnectionSlot>) {
        guard let (client, upstream) = backend.makeDirect(client: p.pointee.client, upstream: p.pointee.upstream) else {
            statistics.add(.directDescriptorMisses)
            return
        }
        p.pointee.setClient(client)
        p.pointee.setUpstream(upstream)
        p.pointee.splice = .never
        statistics.add(.directBridges)
    }

    /// The PROXY header for an upstream: the balancer's view when one told us, else this
    /// connection's own peer and local address. Sent first on the fresh upstream socket,
    /// whose send buffer takes it whole.
    func sendProxyHeader(_ p: UnsafeMutablePointer<ConnectionSlot>) -> Bool {
        let l = listeners[Int(p.pointee.listener)]
        guard let version = l.pool?.sendProxyProtocol ?? l.bound.rule.sendProxyProtocol else { return true }
        var header = ProxyProtocol.Header.local
        if p.pointee.session >= 0, let proxied = negotiations[Int(p.pointee.session)]?.proxied {
            header = .proxied(source: ProxyProtocol.Endpoint(proxied.source), destination: ProxyProtocol.Endpoint(proxied.destination))
        } else if let peer = try? Syscall.peerAddress(p.pointee.client), let local = try? Syscall.localAddress(p.pointee.client) {
            header = .proxied(source: ProxyProtocol.Endpoint(peer), destination: ProxyProtocol.Endpoint(local))
        }
        let bytes = ProxyProtocol.encode(header, version: version)
        return bytes.withUnsafeBytes { backend.sendNow(fd: p.pointee.upstream, $0) } == bytes.count
    }
}

extension ProxyProtocol.Endpoint {
    /// IPv4 (also IPv4-mapped IPv6) as 4 bytes, IPv6 as 16.
    public init(_ address: SocketAddress) {
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
