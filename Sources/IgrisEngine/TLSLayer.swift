import Glibc
import IgrisTLS

/// TLS on a connection's sides: the handshake (with the client after accept, with the
/// upstream after connect), the negotiation's bytes and replies through the client's
/// session, and the bridge's two transforms — a direction whose source is TLS decrypts what
/// it received in its own buffer, one whose destination is TLS encrypts its buffer before
/// the send. Every byte moves with the engine's own recv and send; OpenSSL sees memory only
/// (`TLSSession`).
///
/// Sizes that keep this in one buffer per step:
/// - decrypting: a recv takes at most `size - tlsDecryptHeadroom`, so whatever the session
///   can decrypt (those bytes plus the partial record it held) fits the buffer: after each
///   read the session holds no whole record, and nothing waits in it for a buffer.
/// - encrypting: a recv takes at most `size - tlsEncryptHeadroom`, so its records (16 KiB
///   each, plus at most 29 bytes of framing) fit the buffer they are written back into; any
///   records beyond (an alert or key update queued meanwhile) go out with the next send.
extension Worker {
    /// A whole record (16 KiB of plaintext, its framing, padding) beyond a recv's bytes.
    static var tlsDecryptHeadroom: Int { 18 * 1024 }
    static var tlsEncryptHeadroom: Int { 1024 }
    /// Ciphertext read per readiness while handshaking or negotiating, and the most a session
    /// may hold unread then: a peer can't make the worker buffer more.
    static var tlsHandshakeInputLimit: Int { 64 * 1024 }

    @inline(__always)
    func tlsSession(_ s: Int32, side: Int) -> TLSSession? { side == 0 ? clientTLS[s] : upstreamTLS[s] }

    // MARK: - Handshakes

    /// A client of a TLS listener: the handshake first (a counted handshake under the
    /// listener's handshake timeout), then the mode's negotiation or the forward's connect.
    func startServerTLS(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ context: TLSServerContext) {
        guard let session = context.makeSession() else {
            logger.error("TLS: OpenSSL could not make a session", metadata: ["listener": "\(listeners[Int(p.pointee.listener)].name)"])
            closeSlot(s, abort: true)
            return
        }
        clientTLS[s] = session
        p.pointee.tls = TLSSides.client | TLSSides.clientHandshake
        p.pointee.state = .negotiating
        wheel.schedule(s, deadline: now + tlsHandshakeTimeout(p), table: table)
        continueHandshake(s, p, side: 0)
    }

    func tlsHandshakeTimeout(_ p: UnsafeMutablePointer<ConnectionSlot>) -> UInt64 {
        let rule = listeners[Int(p.pointee.listener)].bound.rule
        return rule.negotiator?.timeoutNanoseconds ?? rule.handshakeTimeoutNanoseconds ?? 10_000_000_000
    }

    /// upstream_tls: the upstream is connected (and any PROXY header sent, in the clear as
    /// HAProxy's `send-proxy` with `ssl` does); the connect timeout bounds the handshake too.
    func startClientTLS(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ context: TLSClientContext, host: String) {
        guard let session = context.makeSession(host: host) else {
            closeSlot(s, abort: true, reason: .connectFailed)
            return
        }
        upstreamTLS[s] = session
        p.pointee.tls |= TLSSides.upstream | TLSSides.upstreamHandshake
        p.pointee.lastActivity = now
        continueHandshake(s, p, side: 1)
    }

    /// Takes what the peer sent, steps the handshake, sends what it produced.
    func continueHandshake(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, side: Int) {
        guard let session = tlsSession(s, side: side) else { return }
        if let failure = receiveCiphertext(s, p, side: side, session) {
            failHandshake(s, p, side: side, failure)
            return
        }
        let queued = session.pendingOutput
        let step = session.handshake()
        // A server's last step writes its session tickets: the first records under its
        // traffic key, which kTLS must count.
        let ticketRecords = step == .done ? session.pendingRecords(from: queued) : nil
        let sent = flushTLS(s, p, side: side)
        switch step {
        case .wantInput:
            if !sent { failHandshake(s, p, side: side, TLSFailure(.peerGone, "send failed")); return }
            armTLSRead(s, p, side: side)
        case .failed(let failure):
            failHandshake(s, p, side: side, failure)
        case .done:
            if !sent { failHandshake(s, p, side: side, TLSFailure(.peerGone, "send failed")); return }
            handshakeDone(s, p, side: side, session, ticketRecords: ticketRecords)
        }
    }

    private func handshakeDone(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, side: Int, _ session: TLSSession, ticketRecords: Int?) {
        statistics.add(.tlsHandshakes)
        if session.resumed { statistics.add(.tlsResumed) }
        if side == 1 {
            p.pointee.tls &= ~TLSSides.upstreamHandshake
            session.releaseMemory(threshold: 0)
            // Nothing has gone out under the client's traffic key yet (its Finished is the
            // handshake's); the server's tickets come under its own and are counted as read.
            if listeners[Int(p.pointee.listener)].pool?.tls?.settings.protectRecordsItself == true { session.startCountingRecords(sent: 0) }
            statistics.recordTLSHandshake(now &- p.pointee.lastActivity)
            startBridging(s, p)
            return
        }
        p.pointee.tls &= ~TLSSides.clientHandshake
        session.releaseMemory(threshold: 0)
        statistics.recordTLSHandshake(now &- p.pointee.openedAt)
        wheel.cancel(s, table: table)
        let l = listeners[Int(p.pointee.listener)]
        if let identity = l.bound.rule.tls?.settings.clientCA != nil ? clientIdentity(s, p, session) : nil, !identity {
            return  // refused and closed
        }
        if let factory = l.bound.rule.negotiator {
            // The negotiation reads and replies through OpenSSL; its records are counted so
            // that bridging can go on without it (`protectRecords`, from `startBridging`).
            if l.bound.rule.tls?.protectsRecordsItself == true, let ticketRecords {
                session.startCountingRecords(sent: ticketRecords)
            }
            startNegotiation(s, p, factory, peer: try? Syscall.peerAddress(p.pointee.client))
        } else {
            if l.bound.rule.tls?.offloadsToKernel == true, let ticketRecords, !offloadToKernel(s, p, session, sent: ticketRecords) { return }
            if l.bound.rule.tls?.protectsRecordsItself == true, p.pointee.tls & TLSSides.clientInKernel == 0, let ticketRecords {
                session.startCountingRecords(sent: ticketRecords)
                if decryptBuffered(session) { protectRecords(session) }
            }
            endHandshakeCount(s, p)
            p.pointee.state = .connecting
            connectForward(s, p)
        }
    }

    /// kTLS: the client side's records go to the kernel (a forward listener's TLS 1.3
    /// connection, right after its handshake): the session's tickets are out (`sent`
    /// records under our key), whatever the client sent behind its Finished is decrypted here
    /// and kept for the upstream, and the kernel takes over from the next record each way.
    /// False when the connection was closed (the kernel took one side and refused the other).
    private func offloadToKernel(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ session: TLSSession, sent: Int) -> Bool {
        guard session.pendingOutput == 0, let received = session.bufferedRecords,
              let transmit = session.kernelKeys(sending: true), let receive = session.kernelKeys(sending: false) else { return true }
        guard decryptBuffered(session), session.holdsNoInput else { return true }
        switch KernelTLS.install(fd: p.pointee.client, transmit: transmit, sent: UInt64(sent), receive: receive, received: UInt64(received)) {
        case .installed:
            // The session now only carries the early plaintext to `startBridging`.
            p.pointee.tls = (p.pointee.tls & ~TLSSides.client) | TLSSides.clientInKernel
            statistics.add(.tlsOffloaded)
            return true
        case .unavailable(let e):
            statistics.add(.tlsOffloadFailures)
            logger.debug("kTLS not taken; user space goes on", metadata: ["error": "\(Errno.describe(e))"])
            return true
        case .broken(let e):
            statistics.add(.tlsOffloadFailures)
            logger.warning("kTLS took the transmit side and refused the receive side; connection closed", metadata: ["error": "\(Errno.describe(e))"])
            closeSlot(s, abort: true, reason: .tlsFailed)
            return false
        }
    }

    /// Without kTLS, a client session's records go on without OpenSSL's `SSL` object, from
    /// the records counted since the handshake (`TLSSession.startCountingRecords`), at the
    /// first moment nothing is pending either way and the input ends on a record: at the
    /// handshake's end (a forward's, like kTLS: tickets out, what the client sent behind its
    /// Finished decrypted and kept for the upstream), at the start of bridging (after a
    /// SOCKS5 or HTTPS-proxy negotiation), or after a later read.
    func protectRecords(_ session: TLSSession) {
        if session.protectRecordsWhenAligned() { statistics.add(.tlsRecordsWithoutOpenSSL) }
    }

    /// mTLS: the verified certificate's name is a user of the users file, whose limits,
    /// rates and expiry then apply (no password is asked). True when it may go on.
    private func clientIdentity(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ session: TLSSession) -> Bool? {
        let l = listeners[Int(p.pointee.listener)]
        let useSAN = l.bound.rule.tls?.settings.clientIdentity == .subjectAltName
        guard let name = session.peerName(subjectAltName: useSAN) else { return nil }
        guard !accounts.isEmpty else { return nil }  // no users file: the certificate alone admits
        guard let index = accountIndex[name] else {
            refuseIdentity(s, p, name, "not in the users file")
            return false
        }
        let account = accounts[Int(index)]
        var wallClock = timespec()
        clock_gettime(CLOCK_REALTIME, &wallClock)
        if account.isRevoked(atEpochSeconds: Int64(wallClock.tv_sec)) {
            refuseIdentity(s, p, name, "account expired or removed")
            return false
        }
        guard account.tryAcquireConnection() else {
            statistics.add(.userLimitRejections)
            refuseIdentity(s, p, name, "at its max_connections")
            return false
        }
        p.pointee.user = index
        p.pointee.rateLimited = account.isRateLimited
        statistics.add(.tlsClientIdentities)
        return true
    }

    private func refuseIdentity(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ name: String, _ why: String) {
        statistics.add(.authFailures)
        logger.info("TLS client certificate refused", metadata: [
            "listener": "\(listeners[Int(p.pointee.listener)].name)", "user": "\(name.debugDescription)", "reason": "\(why)",
        ])
        if let session = clientTLS[s] {
            session.shutdown()
            _ = flushTLS(s, p, side: 0)
        }
        closeSlot(s, abort: false, reason: .refused)
    }

    func failHandshake(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, side: Int, _ failure: TLSFailure) {
        statistics.add(WorkerStatistics.tlsFailureCounter(failure.reason))
        _ = flushTLS(s, p, side: side)  // the alert, if OpenSSL made one
        let peer = (try? Syscall.peerAddress(side == 0 ? p.pointee.client : p.pointee.upstream))?.description ?? "-"
        logger.info(side == 0 ? "TLS handshake with a client failed" : "TLS handshake with the upstream failed", metadata: [
            "listener": "\(listeners[Int(p.pointee.listener)].name)", "peer": "\(peer)",
            "reason": "\(failure.reason.rawValue)", "error": "\(failure.detail)",
        ])
        if side == 1 && tryNextServerAfterTLSFailure(s, p) { return }
        closeSlot(s, abort: false, reason: side == 0 ? .tlsFailed : .connectFailed)
    }

    /// upstream_tls: the handshake with this pool server failed; like a failed connect, the
    /// next healthy server not yet tried gets the connection (within the same connect
    /// timeout). False when there is none.
    private func tryNextServerAfterTLSFailure(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) -> Bool {
        guard p.pointee.server >= 0, hasNextServer(p) else { return false }
        statistics.add(.connectFailures)
        upstreamTLS[s] = nil
        // Whatever is still armed on the socket (a poll for its bytes, a wait for room) is
        // cancelled with it.
        var pending = PendingOperations(write: direction(p, 0).pointee.pendingWrite(token(s, .none, 0)))
        if p.pointee.tls & TLSSides.upstreamPollArmed != 0 { pending.read = token(s, .negotiationReadable, 1) }
        p.pointee.tls &= ~(TLSSides.upstream | TLSSides.upstreamHandshake | TLSSides.upstreamPollArmed)
        direction(p, 0).pointee.writing = .idle
        switchToNextServer(s, p, pending: pending, abort: true)
        return true
    }

    /// Reads the ciphertext queued on a side's socket into its session (handshake and
    /// negotiation phases), at most `tlsHandshakeInputLimit` per call. A failure (EOF, an
    /// error) for the caller to close with; nil when it may go on.
    func receiveCiphertext(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, side: Int, _ session: TLSSession) -> TLSFailure? {
        let fd = side == 0 ? p.pointee.client : p.pointee.upstream
        var total = 0
        while total < Self.tlsHandshakeInputLimit && session.bufferedCiphertext < Self.tlsHandshakeInputLimit {
            let n = backend.receiveNow(fd: fd, into: scratch, length: Self.scratchSize)
            if n > 0 {
                session.feed(scratch, count: n)
                total += n
                continue
            }
            if n == -Int(EAGAIN) { break }
            // EOF or an error: what arrived before it still counts (an alert explains more).
            if total > 0 || session.bufferedCiphertext > 0 { break }
            return TLSFailure(.peerGone, n == 0 ? "the peer closed the connection" : Errno.describe(Int32(-n)))
        }
        return nil
    }

    private func armTLSRead(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, side: Int) {
        if side == 0 {
            armNegotiationRead(s, p)
            return
        }
        guard p.pointee.tls & TLSSides.upstreamPollArmed == 0 else { return }
        p.pointee.tls |= TLSSides.upstreamPollArmed
        p.pointee.inflight += 1
        backend.pollReadable(fd: p.pointee.upstream, token: token(s, .negotiationReadable, 1))
    }

    /// The upstream has handshake bytes (or failed).
    func onUpstreamTLSReadable(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ result: Int32) {
        p.pointee.tls &= ~TLSSides.upstreamPollArmed
        guard p.pointee.state == .connecting, p.pointee.tls & TLSSides.upstreamHandshake != 0 else { return }
        continueHandshake(s, p, side: 1)
    }

    // MARK: - Records out, outside the bridge's sends

    /// Sends a side's pending records now (handshake flights, negotiation replies, alerts,
    /// close_notify), as much as its socket takes; the rest stays in the session and goes
    /// when the socket has room (a writable poll while not bridging, the next send while
    /// bridging). False when the socket failed.
    @discardableResult
    func flushTLS(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, side: Int) -> Bool {
        guard let session = tlsSession(s, side: side) else { return true }
        let fd = side == 0 ? p.pointee.client : p.pointee.upstream
        let writer = direction(p, 1 - side)  // the direction whose destination this socket is
        while session.pendingOutput > 0 {
            guard writer.pointee.writing == .idle else { return true }  // goes after that send
            let n = session.withPendingOutput { backend.sendNow(fd: fd, $0) }
            if n > 0 {
                session.discardOutput(n, scratch: scratch, scratchSize: Self.scratchSize)
                continue
            }
            if n != -Int(EAGAIN) { return false }
            if p.pointee.state != .bridging {
                writer.pointee.writing = .waitingForRoom
                p.pointee.inflight += 1
                backend.pollWritable(fd: fd, token: token(s, .room, 1 - side))
            }
            return true
        }
        return true
    }

    // MARK: - The bridge's transforms

    /// Direction `d`'s source is TLS: decrypts the `n` bytes just received into buffer `b`
    /// itself. The plaintext length (0: nothing whole yet), or nil when the direction ended
    /// (close_notify: treated as EOF) or failed (the connection is then being closed).
    func decryptReceived(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ b: UInt16, _ n: Int) -> Int? {
        guard let session = tlsSession(s, side: d) else { return n }
        let buffer = backend.buffers.pointer(b)
        session.feed(buffer, count: n)
        let result = session.read(into: buffer, capacity: backend.buffers.size, spare: scratch, spareCapacity: Self.scratchSize)
        // A short read: the peer paused, so the session's memory can go back.
        if n < backend.buffers.size / 4 { session.releaseMemory() }
        // A key update or alert the read produced goes out now if nothing is being sent there.
        if session.pendingOutput > 0 { flushTLS(s, p, side: d) }
        switch result {
        case .bytes(let plain):
            protectRecords(session)
            return plain
        case .wantInput:
            protectRecords(session)
            return 0
        case .closed: return nil
        case .failed(let failure):
            statistics.add(.tlsRecordFailures)
            logger.info("TLS record failed", metadata: [
                "listener": "\(listeners[Int(p.pointee.listener)].name)", "side": "\(d == 0 ? "client" : "upstream")",
                "reason": "\(failure.reason.rawValue)", "error": "\(failure.detail)",
            ])
            returnBuffer(b)
            closeSlot(s, abort: true)
            return nil
        }
    }

    /// Direction `d`'s destination is TLS: replaces the plaintext in its send buffer with the
    /// records that carry it (and any records queued before them), ready for `armSend`.
    @inline(__always)
    func encryptSendBuffer(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        guard let session = tlsSession(s, side: 1 - d) else { return }
        let dir = direction(p, d)
        let buffer = backend.buffers.pointer(dir.pointee.sendBuffer)
        let plain = Int(dir.pointee.sendRemaining)
        _ = session.write(buffer, count: plain)
        dir.pointee.sendOffset = 0
        dir.pointee.sendRemaining = UInt32(session.takeOutput(into: buffer, capacity: backend.buffers.size))
        if plain < backend.buffers.size / 4 { session.releaseMemory() }
    }

    /// After a send to a TLS destination completed: records still queued in the session go
    /// out next, in the same buffer. True when a send was armed for them.
    func sendQueuedRecords(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) -> Bool {
        guard let session = tlsSession(s, side: 1 - d), session.pendingOutput > 0 else { return false }
        let dir = direction(p, d)
        dir.pointee.sendOffset = 0
        dir.pointee.sendRemaining = UInt32(session.takeOutput(into: backend.buffers.pointer(dir.pointee.sendBuffer), capacity: backend.buffers.size))
        armSend(s, p, d)
        return true
    }

    /// The largest recv for direction `d` (0: the whole buffer).
    @inline(__always)
    func tlsReadLimit(_ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) -> Int {
        let size = backend.buffers.size
        if p.pointee.tls & TLSSides.source(d) != 0 { return size - Self.tlsDecryptHeadroom }
        if p.pointee.tls & TLSSides.destination(d) != 0 { return size - Self.tlsEncryptHeadroom }
        return 0
    }

    /// Direction `d` reached its end: to a TLS destination, close_notify goes first.
    func sendCloseNotify(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        guard let session = tlsSession(s, side: 1 - d) else { return }
        session.shutdown()
        flushTLS(s, p, side: 1 - d)
    }

    /// Plaintext the client's session holds before bridging (read with the negotiation, or
    /// decrypted with the handshake's last flight): it goes to the upstream first.
    func takeEarlyPlaintext(_ s: Int32) -> [UInt8]? {
        guard let session = clientTLS[s] else { return [] }
        guard decryptBuffered(session) else { return nil }
        let bytes = session.negotiationBytes
        session.negotiationBytes = []
        if table.pointer(s).pointee.tls & TLSSides.clientInKernel != 0 {
            clientTLS[s] = nil  // the kernel has the records now: OpenSSL's state can go
        }
        return bytes
    }

    /// Decrypts whatever the session holds onto `negotiationBytes`; false when a record failed.
    private func decryptBuffered(_ session: TLSSession) -> Bool {
        while session.hasBufferedInput {
            switch session.read(into: scratch, capacity: Self.scratchSize) {
            case .bytes(let n): session.negotiationBytes += UnsafeRawBufferPointer(start: scratch, count: n)
            case .wantInput, .closed: return true
            case .failed: return false
            }
        }
        return true
    }

    /// The access log's `tls` field: version and cipher of the client side (or upstream's),
    /// or `kernel` once kTLS carries it.
    func tlsDescription(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) -> String? {
        if p.pointee.tls & TLSSides.clientInKernel != 0 { return "kernel" }
        guard let session = clientTLS[s] ?? upstreamTLS[s], session.handshakeDone else { return nil }
        return "\(session.version)/\(session.cipher)"
    }
}
