import CLinux
import Glibc

/// The worker's loop: wait for completions, route them, fire timers, then the once-per-turn
/// chores (health checks, paused listeners, buffer waiters); wake-ups from other threads
/// (reload, drain, negotiation results) and the drain itself.
extension Worker {
    func run() throws(SyscallError) {
        start()
        defer { accessLogger?.flush() }
        while try turn() {}
    }

    /// Arms the listeners and the wake-up poll.
    func start() {
        statistics.set(.threadID, Int64(igris_thread_id()))
        for i in listeners.indices { armAccept(i) }
        armWake()
        if !accounts.isEmpty { endRevokedTunnels() }
        publishGauges()
    }

    /// One loop turn; false once drained (nothing open, no listener left).
    func turn() throws(SyscallError) -> Bool {
        let timeout = nextTimeout()
        if busy && configuration.busyPollNanoseconds > 0 && timeout != 0 {
            busyPoll(until: Syscall.monotonicNanoseconds() + min(configuration.busyPollNanoseconds, timeout ?? .max))
        }
        try backend.waitForCompletions(timeoutNanoseconds: timeout)
        now = Syscall.monotonicNanoseconds()
        busy = false
        backend.drainCompletions {
            busy = true
            handle($0)
        }
        if deliveredFD >= 0 { flushDeliveredDatagrams() }
        wheel.expire(now: now, table: table, into: &expired)
        if !expired.isEmpty {
            for s in expired { timerFired(s) }
            expired.removeAll(keepingCapacity: true)
        }
        if !probes.isEmpty { runHealthChecks() }
        resumePausedListeners()
        if bufferWaitersHead < bufferWaiters.count { wakeBufferWaiters() }
        if !reserveWaiters.isEmpty && !backend.buffers.inReserve { wakeReserveWaiters() }
        if !awaitingDescriptor.isEmpty { connectWaitingSlots() }
        if now >= nextAccountExpiry { endRevokedTunnels() }
        if now >= nextBufferAdjustment {
            backend.adjustBuffers()
            nextBufferAdjustment = now + Self.bufferAdjustmentNanoseconds
        }
        publishGauges()
        if accessLogPending {
            accessLogPending = false
            accessLogger?.flush()
        }
        if draining {
            if now >= drainDeadline && !abortedAtDeadline { abortAllAtDeadline() }
            if table.active == 0 && listenersOpen == 0 { return false }
        }
        return true
    }

    /// Submits and looks for completions without sleeping until one is ready or `deadline`.
    private func busyPoll(until deadline: UInt64) {
        statistics.add(.busyPolls)
        repeat {
            // A failure here is met again, and thrown, by the wait that follows.
            do throws(SyscallError) { try backend.waitForCompletions(timeoutNanoseconds: 0) } catch { return }
            if backend.hasCompletions {
                statistics.add(.busyPollHits)
                return
            }
        } while Syscall.monotonicNanoseconds() < deadline
    }

    @inline(__always)
    func handle(_ c: Completion) {
        switch c.token.kind {
        case .accept: onAccept(listener: Int(c.token.index), c)
        case .wake: onWake()
        case .closeListener: listenersOpen -= 1
        case .healthConnect: onHealthConnect(c)
        case .healthClose, .none: break
        default: onSlotCompletion(c)
        }
    }

    func nextTimeout() -> UInt64? {
        // Buffer waiters left while buffers are free: the ones woken this turn may have found
        // no data (on io_uring such a recv takes no buffer and does not complete), so the rest
        // must not wait for some unrelated completion. Each turn wakes at least one; the queue
        // only grows again when a recv finds the pool empty.
        if bufferWaitersHead < bufferWaiters.count && backend.buffers.obtainable > 0 { return 0 }
        var timeout = wheel.nanosecondsUntilNextTimer(now: now)
        // Index loops: runs every turn, and iterating an array of structs that hold strings
        // allocates in unoptimised builds.
        var i = 0
        while i < listeners.count {
            if listeners[i].open && !listeners[i].acceptArmed && listeners[i].pausedUntil > 0 {
                let t = listeners[i].pausedUntil > now ? listeners[i].pausedUntil - now : 0
                timeout = min(timeout ?? t, t)
            }
            i += 1
        }
        if nextAccountExpiry != .max {
            let t = nextAccountExpiry > now ? nextAccountExpiry - now : 0
            timeout = min(timeout ?? t, t)
        }
        if draining && !abortedAtDeadline {
            let t = drainDeadline > now ? drainDeadline - now : 0
            timeout = min(timeout ?? t, t)
        }
        if pausedInLastSecond {
            // Wake once the "accepting paused" state ages out, so readiness comes back.
            let t = lastPause &+ Self.pausedStateNanoseconds &- now
            timeout = min(timeout ?? t, t)
        }
        if backend.buffers.target > backend.buffers.initialActive {
            // The pool may shrink: keep the once-a-second adjustment running while idle.
            let t = nextBufferAdjustment > now ? nextBufferAdjustment - now : 0
            timeout = min(timeout ?? t, t)
        }
        if !probes.isEmpty, let at = nextHealthCheckEvent() {
            let t = at > now ? at - now : 0
            timeout = min(timeout ?? t, t)
        }
        return timeout
    }

    /// How often the buffer pool sets its target from recent use (`BufferPool.adjustTarget`).
    static var bufferAdjustmentNanoseconds: UInt64 { 1_000_000_000 }

    /// How long after its last pause a worker still reports accepting as paused: pauses last
    /// 100 ms and repeat while the shortage lasts, so readiness does not flicker with them.
    static var pausedStateNanoseconds: UInt64 { 1_000_000_000 }

    /// Out of descriptors, as readiness sees it: accepting paused in the last second, or an
    /// accepted client still waits for a descriptor for its upstream.
    var acceptRecentlyPaused: Bool { pausedInLastSecond || !awaitingDescriptor.isEmpty }

    private var pausedInLastSecond: Bool { lastPause != 0 && now &- lastPause < Self.pausedStateNanoseconds }

    private func publishGauges() {
        statistics.set(.acceptPaused, acceptRecentlyPaused ? 1 : 0)
        statistics.set(.buffersInUse, Int64(backend.buffers.inUse))
        statistics.set(.buffersPeak, Int64(backend.buffers.peakInUse))
        statistics.set(.buffersActive, Int64(backend.buffers.active + backend.buffers.reserveCount))
        statistics.set(.buffersParked, Int64(backend.buffers.parkedTotal))
        statistics.set(.completionOverflows, Int64(backend.completionOverflows))
        statistics.set(.cancellations, Int64(backend.cancellations))
        statistics.set(.pipesInUse, Int64(pipes.inUse))
        statistics.set(.handshakesActive, Int64(handshakesActive))
        statistics.set(.pipesPeak, Int64(pipes.peakInUse))
    }

    private func armWake() {
        backend.pollReadable(fd: control.wakeFD, token: OperationToken(index: 0, generation: 0, kind: .wake))
    }

    func onWake() {
        backend.consumeWake(fd: control.wakeFD)
        // The eventfd also wakes the loop for negotiation results (names, passwords) and reloads.
        deliverMailbox()
        for command in control.takeReloads() { applyReload(command) }
        if let updated = control.takeAccounts() {
            accounts = updated
            endRevokedTunnels()
        }
        if control.isDrainRequested && !draining { beginDrain() }
        if control.isAbortRequested { drainDeadline = now }
        armWake()
    }

    /// SIGHUP: close removed listeners (their connections carry on), open added ones, and
    /// re-plan health checks for the pools in use.
    func applyReload(_ command: ReloadCommand) {
        for i in listeners.indices where listeners[i].open && command.remove.contains(listeners[i].bound.index) { closeListener(i) }
        for l in command.add {
            listeners.append(Listener(bound: l))
            listenersOpen += 1
            if draining { closeListener(listeners.count - 1) } else { armAccept(listeners.count - 1) }
        }
        stopHealthChecks()
        let open = listeners.indices.filter { listeners[$0].open }.map { listeners[$0].bound.rule }
        probes = Self.makeProbes(listeners: open, worker: configuration.index, workers: configuration.workerCount, now: now)
    }

    /// At an account's expiry and after a users-file reload: tunnels and UDP associations of
    /// expired and removed users end now (not at their next connect), and changed rate limits
    /// take effect.
    /// Then the timer is set for the next expiry.
    func endRevokedTunnels() {
        var wallClock = timespec()
        clock_gettime(CLOCK_REALTIME, &wallClock)
        let epoch = Int64(wallClock.tv_sec)
        var s: Int32 = 0
        while s < table.used {
            let p = table.pointer(s)
            let state = p.pointee.state
            if p.pointee.user >= 0 && (state == .connecting || state == .bridging || state == .associated) {
                let account = accounts[Int(p.pointee.user)]
                if account.isRevoked(atEpochSeconds: epoch) {
                    statistics.add(.accountsRevoked)
                    closeSlot(s, abort: true, reason: .revoked)
                } else {
                    p.pointee.rateLimited = account.isRateLimited
                }
            }
            s += 1
        }
        var next = Int64.max
        for a in accounts where !a.isRemoved {
            if let e = a.expiresAt, e > epoch { next = min(next, e) }
        }
        // Expiries are whole seconds: wake just past the one due, by the wall clock's ns.
        nextAccountExpiry = next == .max ? .max : now + UInt64(next - epoch) * 1_000_000_000 - UInt64(wallClock.tv_nsec) + 1_000_000
    }

    func beginDrain() {
        draining = true
        stopHealthChecks()
        drainDeadline = now + configuration.drainTimeoutNanoseconds
        for i in listeners.indices where listeners[i].open { closeListener(i) }
    }

    func abortAllAtDeadline() {
        abortedAtDeadline = true
        var s: Int32 = 0
        while s < table.used {
            let state = table.pointer(s).pointee.state
            if state == .negotiating || state == .connecting || state == .bridging || state == .associated {
                statistics.add(.drainAborted)
                closeSlot(s, abort: true, reason: .drainDeadline)
            }
            s += 1
        }
    }

    func timerFired(_ s: Int32) {
        let p = table.pointer(s)
        switch p.pointee.state {
        case .negotiating:
            statistics.add(.handshakeTimeouts)
            if p.pointee.tls & TLSSides.clientHandshake != 0 { statistics.add(WorkerStatistics.tlsFailureCounter(.timeout)) }
            closeSlot(s, abort: false, reason: .handshakeTimeout)
        case .connecting:
            statistics.add(.connectTimeouts)
            if p.pointee.tls & TLSSides.upstreamHandshake != 0 { statistics.add(WorkerStatistics.tlsFailureCounter(.timeout)) }
            connectTimedOut(s, p)
        case .bridging:
            if p.pointee.rateLimited { resumeThrottled(s, p) }
            if let idle = listeners[Int(p.pointee.listener)].idleTimeoutNanoseconds, now &- p.pointee.lastActivity >= idle {
                statistics.add(.idleTimeouts)
                closeSlot(s, abort: false, reason: .idleTimeout)
                return
            }
            scheduleBridgeTimer(s, p)
        case .associated:
            let idle = associationIdleNanoseconds(p)
            if now &- p.pointee.lastActivity >= idle {
                statistics.add(.idleTimeouts)
                closeSlot(s, abort: false, reason: .idleTimeout)
            } else {
                wheel.schedule(s, deadline: p.pointee.lastActivity + idle, table: table)
            }
        default:
            break
        }
    }
}
