import Glibc
import IgrisProtocols
import CLinux
import Logging
import IgrisTLS

/// The engine's side of a negotiation: peek the client's bytes, hand them to the listener's
/// `Negotiation`, take exactly what it consumed, and carry out its action (reply, wait,
/// connect, bridge, close). The protocols themselves live in IgrisNegotiation.
extension Worker {
    func startNegotiation(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ factory: any NegotiatorFactory, peer: SocketAddress?) {
        let h: Int32
        if let free = freeNegotiations.popLast() {
            h = free
        } else {
            h = Int32(negotiations.count)
            negotiations.append(nil)
            connectAddresses.append(.allocate(capacity: 1))
        }
        var context = NegotiationContext(
            client: peer, listener: listeners[Int(p.pointee.listener)].name,
            statistics: statistics, logger: logger,
            resume: NegotiationResumer(mailbox: mailbox, slot: s, generation: p.pointee.generation))
        context.authenticatedAccount = p.pointee.user
        negotiations[Int(h)] = factory.makeNegotiation(context)
        p.pointee.session = h
        p.pointee.state = .negotiating
        if p.pointee.timerBucket >= 0 { wheel.cancel(s, table: table) }
        wheel.schedule(s, deadline: now + factory.timeoutNanoseconds, table: table)
        // Clients send their greeting right after connecting, so it has often arrived by the
        // time the accept is handled: look now, and poll only if nothing is there yet.
        onNegotiationReadable(s, p, 0)
    }

    func releaseNegotiation(_ p: UnsafeMutablePointer<ConnectionSlot>) {
        negotiations[Int(p.pointee.session)] = nil
        freeNegotiations.append(p.pointee.session)
        p.pointee.session = -1
    }

    func armNegotiationRead(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        guard !p.pointee.negotiationPollArmed else { return }  // the armed one serves
        p.pointee.negotiationPollArmed = true
        p.pointee.inflight += 1
        backend.pollReadable(fd: p.pointee.client, token: token(s, .negotiationReadable))
    }

    /// The client's bytes are peeked and fed to the negotiation message by message; only
    /// what it consumed is then taken off the socket, so whatever follows the request (a
    /// client that sends data before the reply) stays queued for the bridge.
    func onNegotiationReadable(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ result: Int32) {
        p.pointee.negotiationPollArmed = false
        if p.pointee.tls & TLSSides.clientHandshake != 0 {
            guard p.pointee.state == .negotiating else { return }
            continueHandshake(s, p, side: 0)
            return
        }
        guard p.pointee.state == .negotiating, p.pointee.session >= 0, let negotiation = negotiations[Int(p.pointee.session)] else { return }
        if result < 0 { closeSlot(s, abort: false); return }
        if p.pointee.awaitingAnswer { watchWhileAwaiting(s, p); return }
        let n = p.pointee.tls & TLSSides.client != 0 ? decryptNegotiationInput(s, p) : backend.peek(fd: p.pointee.client, into: scratch, length: Self.scratchSize)
        if n == 0 { closeSlot(s, abort: false); return }  // the client gave up
        if n < 0 {
            if n == -Int(EAGAIN) { armNegotiationRead(s, p) } else { closeSlot(s, abort: true) }
            return
        }
        var offset = 0
        var action = NegotiationAction.read
        while offset < n {
            let (consumed, next) = negotiation.received(UnsafeRawBufferPointer(start: scratch + offset, count: n - offset))
            offset += consumed
            action = next
            guard action.next == .read else { break }
            sendReply(p, action.reply, s)
            action.reply = []
            if consumed == 0 { break }
        }
        if let session = clientTLS[s] {
            session.negotiationBytes.removeFirst(offset)
            // More may be decrypted already: no readiness would say so.
            if action.next == .read && offset > 0 && (session.hasBufferedInput || !session.negotiationBytes.isEmpty) {
                sendReply(p, action.reply, s)
                onNegotiationReadable(s, p, 0)
                return
            }
        } else if offset > 0 {
            // Take what was consumed (it is queued: this cannot block or come up short).
            _ = backend.receiveNow(fd: p.pointee.client, into: scratch, length: offset)
        }
        perform(s, p, action)
    }

    /// A TLS client's negotiation input: its ciphertext taken off the socket, decrypted and
    /// kept in the session (`negotiationBytes`, up to the scratch size), then copied to the
    /// scratch as `peek` would. Bytes there, 0 when the client ended, -EAGAIN for none yet,
    /// another -errno on failure.
    private func decryptNegotiationInput(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) -> Int {
        guard let session = clientTLS[s] else { return -Int(EBADF) }
        let failure = receiveCiphertext(s, p, side: 0, session)
        var ended = failure != nil
        while session.negotiationBytes.count < Self.scratchSize {
            let room = Self.scratchSize - session.negotiationBytes.count
            switch session.read(into: scratch, capacity: room) {
            case .bytes(let n):
                session.negotiationBytes += UnsafeRawBufferPointer(start: scratch, count: n)
                continue
            case .wantInput: break
            case .closed: ended = true
            case .failed(let f):
                statistics.add(.tlsRecordFailures)
                logger.info("TLS record failed", metadata: ["listener": "\(listeners[Int(p.pointee.listener)].name)", "error": "\(f)"])
                return -Int(EPROTO)
            }
            break
        }
        flushTLS(s, p, side: 0)
        if session.negotiationBytes.isEmpty { return ended ? 0 : -Int(EAGAIN) }
        session.negotiationBytes.withUnsafeBytes { scratch.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        return session.negotiationBytes.count
    }

    /// While the answer is computed elsewhere: a client that has gone is closed now, and its
    /// queued work is then skipped (`NegotiationResumer` values for it are dropped). Bytes it
    /// sent ahead stay queued for the negotiation, and the watch ends (a poll would only
    /// fire again at once).
    private func watchWhileAwaiting(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        let n = backend.peek(fd: p.pointee.client, into: scratch, length: 1)
        if n == 0 { closeSlot(s, abort: false); return }
        if n < 0 {
            if n == -Int(EAGAIN) { armNegotiationRead(s, p) } else { closeSlot(s, abort: true) }
        }
    }

    /// Carries out a negotiation's answer.
    func perform(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ action: NegotiationAction) {
        sendReply(p, action.reply, s)
        switch action.next {
        case .read:
            armNegotiationRead(s, p)
        case .wait:
            p.pointee.awaitingAnswer = true
            armNegotiationRead(s, p)
        case .connect(let address):
            beginConnecting(s, p)
            connectNegotiated(s, p, to: address)
        case .connectListenerPool:
            beginConnecting(s, p)
            if !connectUpstream(s) {
                // Out of descriptors: this one does not wait (see `admit` for the one that may).
                statistics.add(.rejectedAtCapacity)
                closeSlot(s, abort: false, reason: .capacity)
            }
        case .associate(let clientPort):
            startAssociation(s, p, clientPort: clientPort)
        case .bridge:
            statistics.add(.handshakesCompleted)
            if let framing = action.uploadFraming {
                p.pointee.framedUpload = true
                uploadFramings[s] = HTTPBodyFraming(framing)
            }
            startBridging(s, p, preamble: action.destinationPreamble)
        case .close(let reason):
            closeAfterReply(s, p, reason)
        }
    }

    /// The negotiation is over: the connect timeout runs from here, and the account the
    /// connection belongs to (if any) is now the slot's to release.
    private func beginConnecting(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        if p.pointee.user < 0, let account = negotiations[Int(p.pointee.session)]?.account, account >= 0 {
            p.pointee.user = account
            p.pointee.rateLimited = accounts[Int(account)].isRateLimited
        }
        guard p.pointee.state == .negotiating else { return }
        endHandshakeCount(s, p)
        p.pointee.state = .connecting
        p.pointee.lastActivity = now  // connect latency is measured from here
        wheel.cancel(s, table: table)
        wheel.schedule(s, deadline: now + listeners[Int(p.pointee.listener)].connectTimeoutNanoseconds, table: table)
    }

    /// Replies are a few hundred bytes at most, the first the socket sends: its send buffer
    /// takes them whole (a failure means the client is gone, and the next read or the close
    /// finds out).
    private func sendReply(_ p: UnsafeMutablePointer<ConnectionSlot>, _ bytes: [UInt8], _ s: Int32) {
        guard !bytes.isEmpty else { return }
        if let session = clientTLS[s] {
            _ = bytes.withUnsafeBytes { session.write($0.baseAddress!, count: $0.count) }
            flushTLS(s, p, side: 0)
            return
        }
        _ = bytes.withUnsafeBytes { backend.sendNow(fd: p.pointee.client, $0) }
    }

    /// Closes after a failure reply with a FIN, not a reset: unread input would make
    /// close() send RST, which can destroy the reply before the client reads it.
    func closeAfterReply(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ reason: CloseReason) {
        var drained = 0
        while drained < 65536 {
            let n = backend.receiveNow(fd: p.pointee.client, into: scratch, length: Self.scratchSize)
            if n <= 0 { break }
            drained += n
        }
        if let session = clientTLS[s] {
            session.shutdown()
            flushTLS(s, p, side: 0)
        }
        _ = backend.shutdown(fd: p.pointee.client, how: Int32(SHUT_WR))
        closeSlot(s, abort: false, reason: reason)
    }

    /// Results of work negotiations handed off (names resolved, passwords checked).
    func deliverMailbox() {
        mailbox.take(into: &mailboxItems)
        guard !mailboxItems.isEmpty else { return }
        for item in mailboxItems {
            guard Int(item.slot) < table.capacity, item.slot < table.used else { continue }
            let p = table.pointer(item.slot)
            // The connection may have timed out or closed while its answer was computed.
            guard p.pointee.generation == item.generation, p.pointee.session >= 0,
                  let negotiation = negotiations[Int(p.pointee.session)] else { continue }
            if p.pointee.state == .associated {
                // A name a held datagram waited for.
                _ = negotiation.resumed(item.value)
                sendResolvedDatagrams(item.slot, p)
                continue
            }
            guard p.pointee.state == .negotiating else { continue }
            p.pointee.awaitingAnswer = false
            perform(item.slot, p, negotiation.resumed(item.value))
        }
        mailboxItems.removeAll(keepingCapacity: true)
    }

    /// The access log line of a connection being released: listener, client, destination,
    /// user, bytes each way, duration, why it closed. logfmt keys; values never hold secrets.
    func logAccess(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ log: any AccessLogSink) {
        var client = "-"
        var destination = "-"
        if let info = accessInfo.removeValue(forKey: s) {
            client = info.client
            destination = info.destination
        }
        if p.pointee.session >= 0, let n = negotiations[Int(p.pointee.session)] {
            // Still negotiating: what the negotiation knows (the balancer's client, if any).
            if !n.clientDescription.isEmpty { client = n.clientDescription }
            if !n.destinationDescription.isEmpty { destination = n.destinationDescription }
        }
        if p.pointee.server >= 0 { destination = serverName(p) }
        let user = p.pointee.user >= 0 ? accounts[Int(p.pointee.user)].name : "-"
        let duration = Double(now &- p.pointee.openedAt) / 1e9
        log.record(AccessRecord(listener: listeners[Int(p.pointee.listener)].name, client: client, destination: destination, user: user,
                                bytesUp: p.pointee.toUpstream.bytes, bytesDown: p.pointee.toClient.bytes,
                                duration: (duration * 1000).rounded() / 1000, reason: p.pointee.closeReason.text,
                                tls: p.pointee.tls != 0 ? tlsDescription(s, p) : nil))
        accessLogPending = true
    }
}
