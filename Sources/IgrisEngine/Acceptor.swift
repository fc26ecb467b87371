import Glibc
import IgrisPolicy

/// Accepting: the multishot accept per listener, admission (max_connections, slots), the
/// pause when descriptors run out, and the one accepted connection that may wait for one.
extension Worker {
    @inline(__always)
    func acceptToken(_ i: Int) -> OperationToken {
        OperationToken(index: UInt32(i), generation: 0, kind: .accept)
    }

    /// How long after running out of descriptors accepts stay single and each resume first
    /// checks that a client and its upstream would get one.
    static var descriptorShortageNanoseconds: UInt64 { 1_000_000_000 }

    /// Margin kept past a multishot accept's burst.
    static var multishotRoom: Int { 64 }

    /// The most one armed multishot accept takes at once: its backend's burst, at most the
    /// listener's backlog and what arrives while it is taken (io_uring takes the whole backlog
    /// in one go, and goes on while connections keep completing: 1,103–1,193 in one turn were
    /// seen from a 1,024 backlog under a 2× overload).
    var acceptBurst: Int { min(backend.acceptBurst, configuration.listenBacklog + configuration.listenBacklog / 2) }

    /// Below this much room, accepts are armed one at a time: every worker's listener may
    /// burst at once, and what is past the capacity would only be closed.
    var multishotMinimumRoom: Int { acceptBurst * configuration.workerCount + Self.multishotRoom }

    /// Within this many descriptors of RLIMIT_NOFILE (judged by the last accepted one's
    /// number: the kernel hands out the lowest free), accepts go one at a time, each client
    /// getting its upstream before the next is taken.
    static var descriptorHeadroom: Int { 4 * multishotRoom }

    var nearDescriptorLimit: Bool { Int(lastAcceptedFD) + 2 * acceptBurst + Self.descriptorHeadroom >= Syscall.descriptorLimit }

    /// Connections listener `i` may still take: global and per-listener max_connections, slots.
    func room(_ i: Int) -> Int {
        var room = min(budget.limit - budget.current, table.capacity - table.active)
        if let own = listeners[i].bound.budget { room = min(room, own.limit - own.current) }
        return room
    }

    /// Arms the accept of listener `i` if there is room; without room connections wait in
    /// the kernel's backlog (never accepted only to be closed) until a slot frees here, or —
    /// the global budget is shared with the other workers — the 100 ms recheck finds room.
    func armAccept(_ i: Int) {
        guard listeners[i].open, !draining else { return }
        if listeners[i].heldClient >= 0 {
            guard room(i) > 0 else {
                listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
                return
            }
            let client = listeners[i].heldClient
            listeners[i].heldClient = -1
            admit(client: client, listener: i)
            if listeners[i].heldClient >= 0 { return }
        }
        let room = room(i)
        guard room > 0 else {
            listeners[i].waitingForRoom = true
            listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
            return
        }
        listeners[i].waitingForRoom = false
        listeners[i].acceptArmed = true
        // Short of descriptors lately: one at a time, or a multishot burst from the backlog
        // would be accepted with no descriptor left to bridge it.
        listeners[i].acceptMultishot = room > multishotMinimumRoom && now >= descriptorsShortUntil && !nearDescriptorLimit
        listeners[i].pausedUntil = 0
        backend.accept(listener: listeners[i].fd, multishot: listeners[i].acceptMultishot, token: acceptToken(i))
    }

    /// Ends an armed multishot accept so that accepting goes on one at a time (the
    /// cancellation's completion re-arms it, unless accepting paused meanwhile).
    private func narrowAccept(_ i: Int) {
        guard listeners[i].acceptArmed, listeners[i].acceptMultishot, !listeners[i].narrowingAccept else { return }
        listeners[i].narrowingAccept = true
        backend.stopAccepting(listener: listeners[i].fd, token: acceptToken(i))
    }

    /// A slot was released: listeners waiting for room look again at the end of this turn.
    func roomFreed() {
        var i = 0
        while i < listeners.count {
            if listeners[i].waitingForRoom && listeners[i].open { listeners[i].pausedUntil = now }
            i += 1
        }
    }

    func closeListener(_ i: Int) {
        listeners[i].open = false
        if listeners[i].heldClient >= 0 {
            Syscall.close(listeners[i].heldClient)
            listeners[i].heldClient = -1
        }
        let pending = listeners[i].acceptArmed ? PendingOperations(read: acceptToken(i)) : .none
        backend.close(fd: listeners[i].fd, pending: pending, abort: false,
                      token: OperationToken(index: UInt32(i), generation: 0, kind: .closeListener))
    }

    func resumePausedListeners() {
        var i = 0
        while i < listeners.count {
            if listeners[i].open && listeners[i].pausedUntil > 0 && listeners[i].pausedUntil <= now {
                if !awaitingDescriptor.isEmpty {
                    // Connections already accepted come first: stay paused while one waits
                    // for a descriptor (still out of them, as far as readiness goes).
                    listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
                    lastPause = now
                } else if now < descriptorsShortUntil && !Syscall.descriptorsAvailable(2) {
                    // Still none for a client and its upstream: accepting one would only close it.
                    listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
                    lastPause = now
                } else if !listeners[i].acceptArmed {
                    armAccept(i)
                }
            }
            i += 1
        }
    }

    func onAccept(listener i: Int, _ c: Completion) {
        if !c.more { listeners[i].acceptArmed = false }
        if c.result >= 0 {
            admit(client: c.result, listener: i)
            if !c.more { armAccept(i) }
            return
        }
        let e = -c.result
        if e == ECANCELED && listeners[i].narrowingAccept {
            listeners[i].narrowingAccept = false
            if listeners[i].pausedUntil == 0 { armAccept(i) }  // unless accepting paused meanwhile
            return
        }
        if e == ECANCELED || !listeners[i].open { return }
        if e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM {
            // Out of descriptors or memory: connections wait in the backlog while some close.
            // Re-arm on a timer instead of spinning on the same error.
            pauseAccepting(errno: e)
            return
        }
        statistics.add(.acceptErrors)
        if e == ECONNABORTED || e == EINTR || e == EAGAIN {
            if !c.more { armAccept(i) }
            return
        }
        logger.warning("accept failed", metadata: ["listener": "\(listeners[i].name)", "error": "\(Errno.describe(e))"])
        if !c.more { listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds }
    }

    /// Stops every listener of this worker for 100 ms (descriptors are per process, so all
    /// of them are out). Ending the multishot accepts keeps the kernel from accepting
    /// connections there would be no descriptor to bridge.
    func pauseAccepting(errno e: Int32) {
        statistics.add(.acceptPauses)
        lastPause = now
        if e == EMFILE || e == ENFILE { descriptorsShortUntil = now + Self.descriptorShortageNanoseconds }
        var i = 0
        while i < listeners.count {
            if listeners[i].open {
                listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
                if listeners[i].acceptArmed { backend.stopAccepting(listener: listeners[i].fd, token: acceptToken(i)) }
            }
            i += 1
        }
        // Once a second at most: the condition lasts as long as the shortage does.
        if now &- lastPauseLog >= 1_000_000_000 {
            lastPauseLog = now
            logger.warning("accept paused for 100 ms", metadata: [
                "error": "\(Errno.describe(e))", "pauses": "\(statistics.load(.acceptPauses))",
            ])
        }
    }

    /// An accepted client: a slot if the budgets allow, then its negotiation or its connect.
    /// Until the slot holds it, the socket is no backend's, so refusing it is a plain close.
    func admit(client: Int32, listener i: Int) {
        // Accepted while the drain began (a completion already on its way): served like the
        // rest, since the client sees it connected. Only past the deadline is it refused.
        if abortedAtDeadline { Syscall.close(client); return }
        let negotiates = listeners[i].bound.rule.negotiator != nil || listeners[i].bound.rule.tls != nil
        var peer: SocketAddress? = nil
        var sourceKey: IPAddress? = nil
        if configuration.sourceLimits.settings.isActive {
            peer = try? Syscall.peerAddress(client)
            if let ip = peer?.ipAddress, !listeners[i].bound.rule.sourceLimitsExempt.contains(where: { $0.contains(ip) }) {
                if negotiates && maxHandshakesHere > 0 && handshakesActive >= maxHandshakesHere && !evictStalledHandshake() {
                    refuseAtSourceLimit(client, peer: peer, listener: i, nil)
                    return
                }
                if let refusal = configuration.sourceLimits.admit(ip.failureKey, handshake: negotiates) {
                    refuseAtSourceLimit(client, peer: peer, listener: i, refusal)
                    return
                }
                sourceKey = ip.failureKey
            }
        }
        func uncount() {
            guard let sourceKey else { return }
            if negotiates { configuration.sourceLimits.handshakeEnded(sourceKey) }
            configuration.sourceLimits.release(sourceKey)
        }
        guard budget.tryAcquire() else {
            uncount()
            noRoom(client, listener: i)
            return
        }
        if let listenerBudget = listeners[i].bound.budget, !listenerBudget.tryAcquire() {
            budget.release()
            uncount()
            noRoom(client, listener: i)
            return
        }
        guard let s = table.allocate() else {
            budget.release()
            listeners[i].bound.budget?.release()
            uncount()
            noRoom(client, listener: i)
            return
        }
        // A multishot accept whose room (or descriptors) ran short goes on one at a time.
        lastAcceptedFD = client
        if room(i) <= multishotMinimumRoom || nearDescriptorLimit { narrowAccept(i) }
        statistics.add(.acceptedTotal)
        statistics.add(.activeConnections)
        statistics.add(listener: listeners[i].bound.index, .accepted)
        statistics.add(listener: listeners[i].bound.index, .active)
        let p = table.pointer(s)
        p.pointee.state = .connecting
        p.pointee.listener = UInt16(i)
        p.pointee.splice = listeners[i].splice
        p.pointee.setClient(client)
        p.pointee.openedAt = now
        p.pointee.lastActivity = now
        if let sourceKey {
            sourceKeys[s] = sourceKey
            p.pointee.sourceCounted = true
            p.pointee.handshakeCounted = negotiates
            if negotiates {
                handshakesActive += 1
                handshakeOrder.append((s, p.pointee.generation))
            }
        }
        if let tls = listeners[i].bound.rule.tls {
            startServerTLS(s, p, tls)
            return
        }
        if let factory = listeners[i].bound.rule.negotiator {
            startNegotiation(s, p, factory, peer: peer ?? (try? Syscall.peerAddress(client)))
            return
        }
        connectForward(s, p, peer: peer)
    }

    /// A forward listener's connection (after its TLS handshake, if any): to the pool.
    /// `peer`: the client's address when admitting it already asked the kernel.
    func connectForward(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, peer known: SocketAddress? = nil) {
        let l = listeners[Int(p.pointee.listener)]
        if accessLogger != nil {
            let peer = (known ?? (try? Syscall.peerAddress(p.pointee.client)))?.description ?? "-"
            accessInfo[s] = (peer, l.pool?.name ?? "-")
        }
        // The connect timeout also bounds the wait for a descriptor (see `connectUpstream`).
        p.pointee.lastActivity = now
        wheel.schedule(s, deadline: now + l.connectTimeoutNanoseconds, table: table)
        if !connectUpstream(s) {
            // Out of descriptors: accepting has paused (and goes single while the shortage
            // lasts), but a multishot accept may have taken a few more meanwhile. They wait
            // for descriptors, oldest first, as bridges close; the connect timeout bounds the
            // wait, so waiting clients cannot hold every descriptor for ever.
            awaitingDescriptor.append((s, p.pointee.generation))
        }
    }

    /// A source at its limit (`SourceLimits`), or this worker at its share of max_handshakes
    /// (`refusal` nil): closed at once, counted, and logged once a second at most (a flood
    /// must not become a flood of log lines).
    private func refuseAtSourceLimit(_ client: Int32, peer: SocketAddress?, listener i: Int, _ refusal: SourceLimits.Refusal?) {
        defer { Syscall.close(client) }  // counted first: whoever sees the close sees the count
        let what: String
        switch refusal {
        case .sourceConnections:
            statistics.add(.sourceConnectionRejections)
            what = "source at max_connections_per_source"
        case nil:
            statistics.add(.handshakeLimitRejections)
            what = "max_handshakes reached"
        case .sourceHandshakes:
            statistics.add(.sourceHandshakeRejections)
            what = "source at max_handshakes_per_source"
        }
        if now &- lastSourceLimitLog >= 1_000_000_000 {
            lastSourceLimitLog = now
            logger.warning("connection refused: \(what)", metadata: [
                "listener": "\(listeners[i].name)", "client": "\(peer?.description ?? "-")",
            ])
        }
    }

    /// How long a handshake must have waited on its client before a newcomer may take its
    /// place at max_handshakes (a real client's handshake takes a few round trips).
    static var stalledHandshakeNanoseconds: UInt64 { 2_000_000_000 }

    /// This worker's share of max_handshakes (0: no limit).
    var maxHandshakesHere: Int {
        let total = configuration.sourceLimits.settings.maxHandshakes
        return total == 0 ? 0 : max(1, total / configuration.workerCount)
    }

    /// max_handshakes is reached: rather than refuse every new client until the handshake
    /// timeout clears sockets that never finish, this worker's oldest handshake that has
    /// waited on its client for `stalledHandshakeNanoseconds` is reset to make room. One
    /// waiting for our answer (a password check, a name) is not the client's doing: kept.
    func evictStalledHandshake() -> Bool {
        var skipped = 0
        defer {
            if handshakeOrderHead > 1024 && handshakeOrderHead * 2 > handshakeOrder.count {
                handshakeOrder.removeFirst(handshakeOrderHead)
                handshakeOrderHead = 0
            }
        }
        while handshakeOrderHead < handshakeOrder.count && skipped < 32 {
            let entry = handshakeOrder[handshakeOrderHead]
            let p = table.pointer(entry.slot)
            guard p.pointee.generation == entry.generation, p.pointee.state == .negotiating, p.pointee.handshakeCounted else {
                handshakeOrderHead += 1  // finished or closed since
                continue
            }
            if now &- p.pointee.openedAt < Self.stalledHandshakeNanoseconds { return false }
            handshakeOrderHead += 1
            if p.pointee.awaitingAnswer {
                handshakeOrder.append(entry)
                skipped += 1
                continue
            }
            statistics.add(.handshakesEvicted)
            closeSlot(entry.slot, abort: true, reason: .capacity)
            return true
        }
        return false
    }

    /// The slot's handshake is over: it no longer counts against the handshake limits.
    func endHandshakeCount(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        guard p.pointee.handshakeCounted else { return }
        p.pointee.handshakeCounted = false
        handshakesActive -= 1
        if let key = sourceKeys[s] { configuration.sourceLimits.handshakeEnded(key) }
    }

    /// The slot closed: its source's count goes down.
    func releaseSourceCount(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        guard p.pointee.sourceCounted else { return }
        endHandshakeCount(s, p)
        p.pointee.sourceCounted = false
        if let key = sourceKeys.removeValue(forKey: s) { configuration.sourceLimits.release(key) }
    }

    /// An accepted connection there is no room for: held until there is (see `heldClient`);
    /// only one of a multishot burst past the capacity, if any, is closed and counted.
    private func noRoom(_ client: Int32, listener i: Int) {
        guard listeners[i].heldClient < 0 else {
            statistics.add(.rejectedAtCapacity)
            Syscall.close(client)
            return
        }
        listeners[i].heldClient = client
        listeners[i].waitingForRoom = true
        listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
        narrowAccept(i)
    }

    /// An entry of `awaitingDescriptor` whose slot has not since timed out, closed or been reused.
    @inline(__always)
    func stillAwaitingDescriptor(_ entry: (slot: Int32, generation: UInt32)) -> Bool {
        let p = table.pointer(entry.slot)
        return p.pointee.generation == entry.generation && p.pointee.state == .connecting && p.pointee.upstream < 0
    }

    /// Once per loop turn while slots wait for a descriptor: oldest first, until one fails.
    func connectWaitingSlots() {
        var k = 0
        while k < awaitingDescriptor.count {
            let entry = awaitingDescriptor[k]
            if stillAwaitingDescriptor(entry) && !connectUpstream(entry.slot) { break }
            k += 1
        }
        awaitingDescriptor.removeFirst(k)
    }
}
