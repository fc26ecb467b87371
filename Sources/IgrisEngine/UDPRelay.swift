import Glibc
import IgrisPolicy

/// One SOCKS5 UDP association's sockets: the relay the client sends to (bound to the address
/// its control connection arrived on) and a dual-stack socket toward destinations.
final class UDPAssociation {
    let relay: Int32
    let outbound: Int32
    /// The negotiation that set it up, deciding where datagrams may go.
    let policy: DatagramPolicy
    let clientIP: IPAddress
    /// The outbound socket is IPv6 (dual-stack); else IPv4 only (a host without IPv6).
    let outboundIPv6: Bool
    /// The client's port: announced in its request, or learnt from its first datagram.
    var clientPort: UInt16
    var relayArmed = false
    var outboundArmed = false

    init(relay: Int32, outbound: Int32, outboundIPv6: Bool, policy: DatagramPolicy, clientIP: IPAddress, clientPort: UInt16) {
        self.policy = policy
        self.relay = relay
        self.outbound = outbound
        self.outboundIPv6 = outboundIPv6
        self.clientIP = clientIP
        self.clientPort = clientPort
    }

    var client: SocketAddress { SocketAddress(ip: clientIP, port: clientPort) }
}

/// SOCKS5 UDP ASSOCIATE on the worker that owns the control connection: datagrams arrive by
/// the backend's continuous receive (io_uring) or a bounded recvmmsg batch per readiness
/// (epoll), leave with one sendmmsg per turn and socket, and are never buffered: what can't
/// be sent at once is dropped and counted, as UDP would. Where a datagram may go is the negotiation's `DatagramPolicy`
/// (ACL, names, per-association bounds); this file moves the bytes.
extension Worker {
    /// Datagrams handled per readiness before the poll is re-armed (other connections' turn).
    static var datagramBatch: Int { 64 }
    /// Room before a payload for the SOCKS5 UDP header (22 bytes at most for an IP source).
    static var datagramHeadroom: Int { 32 }

    /// `.associate`: opens the relay, answers the client, and watches all three sockets.
    func startAssociation(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, clientPort: UInt16) {
        guard let negotiation = negotiations[Int(p.pointee.session)], let policy = negotiation as? DatagramPolicy else {
            closeSlot(s, abort: false, reason: .refused)
            return
        }
        if p.pointee.user < 0 && negotiation.account >= 0 {
            p.pointee.user = negotiation.account
            p.pointee.rateLimited = accounts[Int(negotiation.account)].isRateLimited
        }
        endHandshakeCount(s, p)
        var association: UDPAssociation? = nil
        var relayAddress: SocketAddress? = nil
        if let local = try? Syscall.localAddress(p.pointee.client), let peer = try? Syscall.peerAddress(p.pointee.client),
           let relay = relaySocket(on: local.ipAddress) {
            var outboundIPv6 = true
            var outbound = try? Syscall.datagramSocket(bound: SocketAddress(ip: IPAddress(high: 0, low: 0), port: 0))
            if outbound == nil {
                outboundIPv6 = false
                outbound = try? Syscall.datagramSocket(bound: SocketAddress(ip: IPAddress(ipv4: 0, 0, 0, 0), port: 0))
            }
            if let outbound, let bound = try? Syscall.localAddress(relay) {
                association = UDPAssociation(relay: relay, outbound: outbound, outboundIPv6: outboundIPv6, policy: policy,
                                             clientIP: peer.ipAddress, clientPort: clientPort)
                relayAddress = bound
            } else {
                Syscall.close(relay)
            }
        }
        let action = policy.associated(relay: relayAddress)
        guard let association, case .read = action.next else {
            if let association {
                Syscall.close(association.relay)
                Syscall.close(association.outbound)
            }
            perform(s, p, NegotiationAction(reply: action.reply, .close(.refused)))
            return
        }
        associations[s] = association
        statistics.add(.handshakesCompleted)
        statistics.add(.udpAssociationsTotal)
        statistics.add(.udpAssociationsActive)
        if accessLogger != nil {
            accessInfo[s] = (negotiation.clientDescription, "udp relay \(relayAddress!)")
        }
        _ = action.reply.withUnsafeBytes { backend.sendNow(fd: p.pointee.client, $0) }
        wheel.cancel(s, table: table)
        p.pointee.state = .associated
        p.pointee.lastActivity = now
        wheel.schedule(s, deadline: now + associationIdleNanoseconds(p), table: table)
        armControlWatch(s, p)
        armDatagramPoll(s, p, association, 0)
        armDatagramPoll(s, p, association, 1)
    }

    /// The relay socket on the address the control connection arrived on: any port, or a
    /// free one of `udp_relay_ports` (tried from a random one on, 256 at most; nil when none
    /// is free: the client gets a general failure).
    private func relaySocket(on ip: IPAddress) -> Int32? {
        guard let ports = configuration.udpRelayPorts else { return try? Syscall.datagramSocket(bound: SocketAddress(ip: ip, port: 0)) }
        let count = Int(ports.upperBound) - Int(ports.lowerBound) + 1
        let first = Int.random(in: 0..<count)
        for k in 0..<min(count, 256) {
            let port = UInt16(Int(ports.lowerBound) + (first + k) % count)
            do {
                return try Syscall.datagramSocket(bound: SocketAddress(ip: ip, port: port))
            } catch {
                if error.errno != EADDRINUSE { return nil }
            }
        }
        statistics.add(.udpRelayPortsExhausted)
        return nil
    }

    /// An association without datagrams either way for this long ends (the listener's idle
    /// timeout, else 5 minutes): a client that lost its control connection's FIN can't hold
    /// two sockets for ever.
    func associationIdleNanoseconds(_ p: UnsafeMutablePointer<ConnectionSlot>) -> UInt64 {
        listeners[Int(p.pointee.listener)].idleTimeoutNanoseconds ?? 300_000_000_000
    }

    private func armControlWatch(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        p.pointee.negotiationPollArmed = true
        p.pointee.inflight += 1
        backend.pollReadable(fd: p.pointee.client, token: token(s, .negotiationReadable))
    }

    /// The datagrams of one of the association's sockets: a continuous receive where the
    /// backend has one (io_uring's multishot recvmsg), else a poll for readable.
    private func armDatagramPoll(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ a: UDPAssociation, _ d: Int) {
        if d == 0 { a.relayArmed = true } else { a.outboundArmed = true }
        p.pointee.inflight += 1
        let fd = d == 0 ? a.relay : a.outbound
        let token = token(s, .datagramReadable, d)
        if !backend.armDatagramReceive(fd: fd, token: token) { backend.pollReadable(fd: fd, token: token) }
    }

    /// The control connection: anything it sends is ignored (RFC 1928 has nothing more to
    /// say on it); its end ends the association. A few reads per readiness at most, so a
    /// client streaming junk there can't hold the worker.
    func onControlReadable(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ result: Int32) {
        p.pointee.negotiationPollArmed = false
        guard p.pointee.state == .associated else { return }
        if result < 0 { closeSlot(s, abort: false); return }
        for _ in 0..<4 {
            let n = backend.receiveNow(fd: p.pointee.client, into: scratch, length: Self.scratchSize)
            if n > 0 { continue }
            if n != -Int(EAGAIN) { closeSlot(s, abort: n < 0, reason: n == 0 ? .eof : .reset); return }
            break
        }
        armControlWatch(s, p)
    }

    /// A datagram the backend delivered (io_uring), relayed at once; or the socket is
    /// readable (epoll): datagrams are read a batch at a time (recvmmsg), each routed, and
    /// what goes out is sent as one batch (sendmmsg) to the other socket, until the socket is
    /// drained or `datagramBatch` were handled this turn.
    func onDatagramReadable(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ c: Completion) {
        guard let a = associations[s] else {
            if let id = c.bufferID { backend.releaseDatagram(id) }
            return
        }
        if !c.more { if d == 0 { a.relayArmed = false } else { a.outboundArmed = false } }
        if let id = c.bufferID {
            var kept = false
            if p.pointee.state == .associated, c.result > 0, let datagram = backend.datagram(id, length: Int(c.result)) {
                p.pointee.lastActivity = now
                kept = relay(s, p, a, d, datagram, buffer: id)
            }
            if !kept { backend.releaseDatagram(id) }
        } else if c.result >= 0, p.pointee.state == .associated, let batch = datagramSlots {
            var handled = 0
            while handled < Self.datagramBatch && p.pointee.state == .associated {
                let k = backend.receiveDatagrams(fd: d == 0 ? a.relay : a.outbound, into: batch)
                if k <= 0 { break }
                handled += k
                p.pointee.lastActivity = now
                for i in 0..<k {
                    if batch.truncated(i) { drop(.malformed); continue }
                    let data = batch.slot(i) + batch.headroom
                    let out = d == 0 ? routeFromClient(p, a, data, batch.length(i), from: batch.sender(i))
                                     : routeToClient(p, a, data, batch.length(i), from: batch.sender(i), headroom: batch.headroom)
                    if let out { batch.queue(i, offset: batch.headroom + out.offset, length: out.length, to: out.target) }
                }
                flush(batch, to: d == 0 ? a.outbound : a.relay, direction: d)
                if k < batch.slots { break }
            }
        }
        // A poll completes once; a multishot receive ends on ENOBUFS (its ring ran dry until
        // the datagrams were relayed and their buffers returned) and is armed again.
        let armed = d == 0 ? a.relayArmed : a.outboundArmed
        if p.pointee.state == .associated && !armed && (c.result >= 0 || c.result == -ENOBUFS) { armDatagramPoll(s, p, a, d) }
    }

    /// One datagram delivered in a backend buffer: routed, and queued to go on with the
    /// others of this turn for the same socket (one sendmmsg, `flushDeliveredDatagrams`).
    /// True when queued: the buffer is given back once sent.
    private func relay(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ a: UDPAssociation, _ d: Int,
                       _ datagram: ReceivedDatagram, buffer: UInt16) -> Bool {
        if datagram.truncated { drop(.malformed); return false }
        let out = d == 0 ? routeFromClient(p, a, datagram.payload, datagram.count, from: datagram.sender)
                         : routeToClient(p, a, datagram.payload, datagram.count, from: datagram.sender, headroom: datagram.headroom)
        guard let out, let batch = deliveredDatagrams else { return false }
        let fd = d == 0 ? a.outbound : a.relay
        if fd != deliveredFD || batch.queued == batch.slots { flushDeliveredDatagrams() }
        deliveredFD = fd
        deliveredDirection = d
        batch.queue(datagram.payload + out.offset, length: out.length, to: out.target)
        deliveredBuffers.append(buffer)
        return true
    }

    /// The delivered datagrams queued for one socket go out with one sendmmsg, and their
    /// buffers go back to the backend. Run when the socket changes, at the end of each loop
    /// turn and before an association's sockets close.
    func flushDeliveredDatagrams() {
        guard deliveredFD >= 0, let batch = deliveredDatagrams else { return }
        flush(batch, to: deliveredFD, direction: deliveredDirection)
        for id in deliveredBuffers { backend.releaseDatagram(id) }
        deliveredBuffers.removeAll(keepingCapacity: true)
        deliveredFD = -1
    }

    /// The batch delivered datagrams are sent from (made with the first).
    var deliveredDatagrams: DatagramBatch? {
        if deliveredBatchStorage == nil { deliveredBatchStorage = DatagramBatch(slots: 32, headroom: 0, bufferSize: 0) }
        return deliveredBatchStorage
    }

    /// The worker's datagram slots (made with its first association).
    var datagramSlots: DatagramBatch? {
        if datagramBatchStorage == nil { datagramBatchStorage = DatagramBatch(slots: 16, headroom: Self.datagramHeadroom) }
        return datagramBatchStorage
    }

    private func flush(_ batch: DatagramBatch, to fd: Int32, direction d: Int) {
        let queued = batch.queued
        guard queued > 0 else { return }
        var bytes = 0
        let sent = max(0, backend.sendDatagrams(fd: fd, from: batch, bytes: &bytes))
        if sent < queued { statistics.add(WorkerStatistics.udpDropCounter(.sendFailed), Int64(queued - sent)) }
        statistics.add(d == 0 ? .udpDatagramsToDestination : .udpDatagramsToClient, Int64(sent))
        statistics.add(d == 0 ? .udpBytesToDestination : .udpBytesToClient, Int64(bytes))
    }

    private func drop(_ reason: DatagramDrop) {
        statistics.add(WorkerStatistics.udpDropCounter(reason))
    }

    /// Where a client's datagram (`data`, `length` bytes) goes: the bytes from `offset` on,
    /// to `target`; nil when dropped (counted) or held for a name.
    private func routeFromClient(_ p: UnsafeMutablePointer<ConnectionSlot>, _ a: UDPAssociation, _ data: UnsafeMutableRawPointer,
                                 _ length: Int, from: SocketAddress) -> (offset: Int, length: Int, target: SocketAddress)? {
        // Only the client that holds the control connection, from its one port.
        guard from.ipAddress == a.clientIP, a.clientPort == 0 || from.port == a.clientPort else { drop(.foreignSource); return nil }
        if a.clientPort == 0 { a.clientPort = from.port }
        switch a.policy.route(UnsafeRawBufferPointer(start: data, count: length)) {
        case .drop(let reason):
            drop(reason)
            return nil
        case .held:
            return nil
        case .send(let destination, let offset):
            guard let target = outboundTarget(a, destination) else { drop(.sendFailed); return nil }
            if p.pointee.user >= 0 && datagramOverRate(p, 0, length - offset) { drop(.limit); return nil }
            return (offset, length - offset, target)
        }
    }

    /// Where the outbound socket sends `destination`: a dual-stack socket takes an IPv4
    /// destination as a mapped address; an IPv4-only one can't reach IPv6 (nil).
    private func outboundTarget(_ a: UDPAssociation, _ destination: SocketAddress) -> SocketAddress? {
        if a.outboundIPv6 { return destination.family == AF_INET ? SocketAddress(ipv6Form: destination.ipAddress, port: destination.port) : destination }
        return destination.family == AF_INET ? destination : nil
    }

    /// A destination's datagram for the client: its SOCKS5 header is written in the
    /// `headroom` just before `data`; the result's offset is negative (where the header starts).
    private func routeToClient(_ p: UnsafeMutablePointer<ConnectionSlot>, _ a: UDPAssociation, _ data: UnsafeMutableRawPointer,
                               _ length: Int, from: SocketAddress, headroom: Int) -> (offset: Int, length: Int, target: SocketAddress)? {
        let room = min(headroom, Self.datagramHeadroom)
        guard a.clientPort != 0,
              let header = a.policy.writeReplyHeader(from: from, into: UnsafeMutableRawBufferPointer(start: data - room, count: room)),
              header <= room else {
            drop(.foreignSource)
            return nil
        }
        if p.pointee.user >= 0 && datagramOverRate(p, 1, length) { drop(.limit); return nil }
        // Written at the headroom's start; moved to end where the payload starts.
        if header < room { memmove(data - header, data - room, header) }
        return (-header, header + length, a.client)
    }

    /// A user's bytes either way are counted; a rate-limited user's datagram that would run
    /// past the limit's burst is dropped (UDP has no backpressure to pause).
    private func datagramOverRate(_ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ n: Int) -> Bool {
        let account = accounts[Int(p.pointee.user)]
        if d == 0 { account.addBytes(toDestination: n) } else { account.addBytes(toClient: n) }
        return (d == 0 ? account.upload : account.download).charge(n, now: now) > 0
    }

    /// Names resolved for held datagrams: sent now, one at a time (rare: a name's first use).
    func sendResolvedDatagrams(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        guard let a = associations[s] else { return }
        for (destination, payload) in a.policy.takeResolved() {
            guard let target = outboundTarget(a, destination) else { drop(.sendFailed); continue }
            if p.pointee.user >= 0 && datagramOverRate(p, 0, payload.count) { drop(.limit); continue }
            if payload.withUnsafeBytes({ Syscall.sendDatagram(a.outbound, $0.baseAddress!, $0.count, to: target) }) < 0 {
                drop(.sendFailed)
                continue
            }
            statistics.add(.udpDatagramsToDestination)
            statistics.add(.udpBytesToDestination, Int64(payload.count))
        }
    }

    /// The association's sockets close with its control connection (`closeSlot`).
    func closeAssociation(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        guard let a = associations.removeValue(forKey: s) else { return }
        if deliveredFD == a.relay || deliveredFD == a.outbound { flushDeliveredDatagrams() }
        statistics.add(.udpAssociationsActive, -1)
        for d in 0..<2 {
            let armed = d == 0 ? a.relayArmed : a.outboundArmed
            p.pointee.inflight += 1
            backend.close(fd: d == 0 ? a.relay : a.outbound, pending: armed ? PendingOperations(read: token(s, .datagramReadable, d)) : .none,
                          abort: false, token: token(s, .close, d))
        }
    }
}
