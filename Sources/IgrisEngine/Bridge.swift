import Glibc
import IgrisProtocols

/// The bridge: the copy path of each direction (recv into a pool buffer, send it on),
/// backpressure, half-close, per-user pacing, and closing a connection.
extension Worker {
    @inline(__always)
    func armReadSide(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        if direction(p, d).pointee.path == .splice { armPollIn(s, p, d) } else { armRecv(s, p, d) }
    }

    /// Copy path: arm the read side, for no more than the destination takes at once, so
    /// that every send completes whole and its buffer comes straight back: a buffer never
    /// waits on a full destination. With no room at all the direction waits for room holding
    /// nothing (`woken`: it just did, and reads a little even if the estimate says no room,
    /// rather than poll again). `Direction.room` spares the syscall while the destination is
    /// mostly empty (see `destinationRoom`).
    @inline(__always)
    func armRecv(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, woken: Bool = false) {
        let dir = direction(p, d)
        var limit = 0
        var reserve = false
        if backend.buffers.inReserve {
            guard let limited = reserveRead(s, p, d) else { return }
            limit = limited
            reserve = true
        } else if Int(dir.pointee.room) < backend.buffers.size {
            let room = destinationRoom(dir)
            if room < backend.buffers.size {
                if room < Self.smallestBoundedRead && !woken {
                    armWaitForRoom(s, p, d)
                    return
                }
                limit = max(room, Self.smallestBoundedRead)
            }
        }
        if p.pointee.tls != 0 {
            let most = tlsReadLimit(p, d)
            if most > 0 && (limit == 0 || limit > most) { limit = most }
        }
        dir.pointee.reading = .recv
        p.pointee.inflight += 1
        backend.recv(fd: dir.pointee.source, limit: limit, reserve: reserve, token: token(s, .recv, d))
    }

    /// Only the reserve is left: every main buffer is lent, most of them pinned behind sends
    /// the kernel refused (past tcp_mem it shrinks send buffers under igris's feet). A read
    /// now goes only into an empty destination, from the reserve (its own buffer group, so no
    /// recv armed earlier can land in it), and takes at most `reserveRead` bytes, which the
    /// kernel accepts into an empty queue whatever its memory pressure (tcp_wmem[0]):
    /// interactive connections and new ones carry on, and nothing more is pinned. Other
    /// directions wait, holding nothing, until main buffers are free again. The read's
    /// limit, or nil when the direction waits.
    private func reserveRead(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) -> Int? {
        let dir = direction(p, d)
        dir.pointee.room = 0
        if !DirectDescriptor.isDirect(dir.pointee.destination), let (_, _, queued) = Syscall.sendRoom(dir.pointee.destination), queued > 0 {
            dir.pointee.reading = .waitingForBuffer
            reserveWaiters.append((Int32(s) << 1 | Int32(d), p.pointee.generation))
            statistics.add(.reserveWaits)
            return nil
        }
        return Self.reserveRead
    }

    static var reserveRead: Int { 4096 }

    /// Once the pool is out of its reserve: the directions that waited read again.
    func wakeReserveWaiters() {
        let waiters = reserveWaiters
        reserveWaiters.removeAll(keepingCapacity: true)
        for (entry, generation) in waiters {
            let ws = entry >> 1
            let wd = Int(entry & 1)
            let wp = table.pointer(ws)
            if wp.pointee.generation == generation && wp.pointee.state == .bridging && direction(wp, wd).pointee.reading == .waitingForBuffer {
                armRecv(ws, wp, wd)
            }
        }
    }

    /// Below this much room a bounded read is not worth its syscalls: wait for more.
    static var smallestBoundedRead: Int { 4096 }

    /// Bytes the destination's send buffer takes now (Int.max when it cannot say); sets
    /// `Direction.room`, what later reads may take without asking again. The kernel's
    /// overhead per byte grows as a peer's window closes (skbs split into small segments), so
    /// that allowance is half the room while the buffer is at most half full, and nothing
    /// once it is fuller: a slow reader's direction asks before every read, a healthy one
    /// about once per half of its send buffer.
    @inline(__always)
    func destinationRoom(_ dir: UnsafeMutablePointer<Direction>) -> Int {
        // A direct descriptor can't be asked (no syscall reaches it): reads are not bounded.
        guard !DirectDescriptor.isDirect(dir.pointee.destination), let (room, size, _) = Syscall.sendRoom(dir.pointee.destination) else {
            dir.pointee.room = .max
            return .max
        }
        dir.pointee.room = room * 2 >= size ? UInt32(clamping: room / 2) : 0
        return room
    }

    private func armWaitForRoom(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.writing = .waitingForRoom
        statistics.add(.roomWaits)
        p.pointee.inflight += 1
        backend.pollWritable(fd: dir.pointee.destination, token: token(s, .room, d))
    }

    /// The destination has room again (or an error, which the next send reports).
    func onRoom(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        direction(p, d).pointee.writing = .idle
        guard p.pointee.state == .bridging else {
            // A TLS handshake's or negotiation's records waited for room.
            if p.pointee.tls != 0 && result >= 0 && p.pointee.state != .closing { flushTLS(s, p, side: 1 - d) }
            return
        }
        if result < 0 { peerFailed(s, result); return }
        armRecv(s, p, d, woken: true)
    }

    /// Read ahead of a send in flight: only with room for a whole buffer beyond it (without
    /// asking the socket: a wait for room cannot share the write side with a send), and not
    /// while paused or while the pool is under pressure.
    @inline(__always)
    func mayReadAhead(_ dir: UnsafeMutablePointer<Direction>) -> Bool {
        dir.pointee.path == .copy && dir.pointee.throttledUntil == 0 && Int(dir.pointee.room) >= backend.buffers.size
            && !backend.buffers.underPressure
    }

    @inline(__always)
    func armSend(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.writing = .send
        p.pointee.inflight += 1
        backend.send(fd: dir.pointee.destination, buffer: dir.pointee.sendBuffer, offset: Int(dir.pointee.sendOffset),
                     length: Int(dir.pointee.sendRemaining), token: token(s, .send, d))
    }

    func onRecv(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ c: Completion) {
        let dir = direction(p, d)
        dir.pointee.reading = .idle
        guard p.pointee.state == .bridging else {
            if let b = c.bufferID { returnBuffer(b) }
            return
        }
        guard c.result > 0, let b = c.bufferID else {
            if c.result == 0 {
                dir.pointee.reading = .eof
                if dir.pointee.writing == .idle { queueShutdown(s, p, d) }
            } else if c.result == -ENOBUFS {
                statistics.add(.bufferExhaustions)
                dir.pointee.reading = .waitingForBuffer
                bufferWaiters.append((Int32(s) << 1 | Int32(d), p.pointee.generation))
            } else {
                peerFailed(s, c.result)
            }
            return
        }
        var n = UInt32(c.result)
        if p.pointee.tls & TLSSides.source(d) != 0 {
            guard let plain = decryptReceived(s, p, d, b, Int(n)) else {
                // close_notify: this direction's end (a failure has closed the connection).
                if p.pointee.state == .bridging {
                    returnBuffer(b)
                    dir.pointee.reading = .eof
                    if dir.pointee.writing == .idle { queueShutdown(s, p, d) }
                }
                return
            }
            if plain == 0 {
                returnBuffer(b)
                armRecv(s, p, d)
                return
            }
            n = UInt32(plain)
        }
        if d == 0 && p.pointee.framedUpload {
            n = requestBodyPart(s, b, n)
            if n == 0 {
                // Past the request body: dropped, and the client is read on only for its EOF.
                returnBuffer(b)
                armRecv(s, p, d)
                return
            }
        }
        // These bytes are on their way to the destination: its room shrinks by as much.
        dir.pointee.room = dir.pointee.room > n ? dir.pointee.room - n : 0
        countBytes(s, p, d, n)
        let throttled = p.pointee.user >= 0 && accountBytes(s, p, d, Int(n))
        if p.pointee.splice == .auto && dir.pointee.path == .copy && !p.pointee.rateLimited && !(d == 0 && p.pointee.framedUpload) {
            // Bulk is recognised by reads that fill whole buffers, several in a row;
            // interactive traffic rarely does and stays on copy.
            if Int(n) == backend.buffers.size {
                dir.pointee.fullReads &+= 1
                if Int(dir.pointee.fullReads) >= configuration.spliceThreshold { dir.pointee.path = .copyThenSplice }
            } else {
                dir.pointee.fullReads = 0
            }
        }
        if dir.pointee.writing == .send {
            dir.pointee.queuedBuffer = b
            dir.pointee.queuedLength = n
            return
        }
        dir.pointee.sendBuffer = b
        dir.pointee.sendOffset = 0
        dir.pointee.sendRemaining = n
        if p.pointee.tls & TLSSides.destination(d) != 0 { encryptSendBuffer(s, p, d) }
        armSend(s, p, d)
        // One buffer in flight to the writer, one recv ahead of it — unless the destination
        // has no room for it, the pool is under pressure, or this direction is about to move
        // to splice (the copy path drains first).
        if !throttled && mayReadAhead(dir) { armRecv(s, p, d) }
    }

    func onSend(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.writing = .idle
        guard p.pointee.state == .bridging, result > 0 else {
            returnBuffer(dir.pointee.sendBuffer)
            dir.pointee.sendBuffer = Direction.noBuffer
            if p.pointee.state == .bridging { peerFailed(s, result) }
            return
        }
        let n = UInt32(result)
        if n < dir.pointee.sendRemaining {
            // The room estimate was wrong (the kernel's overhead): ask the socket next time.
            dir.pointee.room = 0
            statistics.add(.shortSends)
            dir.pointee.sendOffset += n
            dir.pointee.sendRemaining -= n
            armSend(s, p, d)
            return
        }
        // Records the buffer could not hold go out next, in the same buffer.
        if p.pointee.tls & TLSSides.destination(d) != 0 && sendQueuedRecords(s, p, d) { return }
        returnBuffer(dir.pointee.sendBuffer)
        dir.pointee.sendBuffer = Direction.noBuffer
        if dir.pointee.queuedBuffer != Direction.noBuffer {
            dir.pointee.sendBuffer = dir.pointee.queuedBuffer
            dir.pointee.sendOffset = 0
            dir.pointee.sendRemaining = dir.pointee.queuedLength
            dir.pointee.queuedBuffer = Direction.noBuffer
            if p.pointee.tls & TLSSides.destination(d) != 0 { encryptSendBuffer(s, p, d) }
            armSend(s, p, d)
            if dir.pointee.reading == .idle && mayReadAhead(dir) { armRecv(s, p, d) }
        } else if dir.pointee.reading == .eof {
            queueShutdown(s, p, d)
        } else if dir.pointee.reading == .idle && dir.pointee.path == .copy && dir.pointee.throttledUntil == 0 {
            // Not read ahead (no room for it): the destination has taken everything, read on.
            armRecv(s, p, d)
        } else if dir.pointee.path == .copyThenSplice && dir.pointee.reading == .idle {
            // The copy path is empty: from here on this direction splices.
            dir.pointee.path = .splice
            statistics.add(.spliceSwitches)
            armPollIn(s, p, d)
        }
    }

    /// Bytes that moved on direction `d`: counters, and the idle clock.
    @inline(__always)
    func countBytes(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ n: UInt32) {
        direction(p, d).pointee.bytes &+= UInt64(n)
        statistics.add(d == 0 ? .bytesClientToUpstream : .bytesUpstreamToClient, Int64(n))
        statistics.add(listener: listeners[Int(p.pointee.listener)].bound.index, d == 0 ? .bytesClientToUpstream : .bytesUpstreamToClient, Int64(n))
        p.pointee.lastActivity = now
    }

    func queueShutdown(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        guard dir.pointee.writing != .shutdown && dir.pointee.writing != .finished else { return }
        if p.pointee.state == .bridging && direction(p, 1 - d).pointee.writing == .finished && dir.pointee.writing == .idle
            && dir.pointee.pipeBytes == 0 && p.pointee.tls & TLSSides.destination(d) == 0 {
            // The other way is already done, and both peers have sent their FIN: closing
            // sends this one's FIN after what is queued, one syscall instead of a shutdown,
            // its completion and then the close.
            dir.pointee.writing = .finished
            statistics.add(.closedGracefully)
            closeSlot(s, abort: false, reason: .eof)
            return
        }
        if p.pointee.tls & TLSSides.destination(d) != 0 { sendCloseNotify(s, p, d) }
        dir.pointee.writing = .shutdown
        p.pointee.inflight += 1
        backend.shutdownWrite(fd: dir.pointee.destination, token: token(s, .shutdown, d))
    }

    func onShutdown(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        direction(p, d).pointee.writing = .finished
        guard p.pointee.state == .bridging else { return }
        if p.pointee.toUpstream.writing == .finished && p.pointee.toClient.writing == .finished {
            statistics.add(.closedGracefully)
            closeSlot(s, abort: false, reason: .eof)
        }
    }

    @inline(__always)
    func returnBuffer(_ b: UInt16) {
        guard b != Direction.noBuffer else { return }
        backend.releaseBuffer(b)
    }

    /// Once per loop turn: re-arm the recv of as many ENOBUFS waiters (oldest first) as there
    /// are free buffers. Not one waiter per returned buffer: a woken recv that finds no data
    /// (io_uring picks the buffer before it looks for data, so ENOBUFS does not prove bytes
    /// were waiting) takes no buffer, and the rest of the queue must not wait on it.
    func wakeBufferWaiters() {
        var budget = backend.buffers.obtainable
        while budget > 0 && bufferWaitersHead < bufferWaiters.count {
            let (entry, generation) = bufferWaiters[bufferWaitersHead]
            bufferWaitersHead += 1
            let ws = entry >> 1
            let wd = Int(entry & 1)
            let wp = table.pointer(ws)
            if wp.pointee.generation == generation && wp.pointee.state == .bridging && direction(wp, wd).pointee.reading == .waitingForBuffer {
                armRecv(ws, wp, wd)
                budget -= 1
            }
        }
        if bufferWaitersHead == bufferWaiters.count {
            bufferWaiters.removeAll(keepingCapacity: true)
            bufferWaitersHead = 0
        }
    }

    /// Of `n` bytes a framed upload received, those still in its request body; the rest are
    /// counted and never forwarded.
    private func requestBodyPart(_ s: Int32, _ b: UInt16, _ n: UInt32) -> UInt32 {
        guard var framing = uploadFramings[s] else { return n }
        let body = framing.consume(UnsafeRawBufferPointer(start: backend.buffers.pointer(b), count: Int(n)))
        uploadFramings[s] = framing
        if body < Int(n) { statistics.add(.bytesAfterRequestDropped, Int64(n) - Int64(body)) }
        return UInt32(body)
    }

    // MARK: - Per-user accounting and bandwidth

    /// Counts a user's bytes; for a rate-limited user, charges the direction's bucket and
    /// returns true when its read side must pause (the wheel wakes it).
    @inline(__always)
    func accountBytes(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ n: Int) -> Bool {
        let account = accounts[Int(p.pointee.user)]
        if d == 0 { account.addBytes(toDestination: n) } else { account.addBytes(toClient: n) }
        let wait = (d == 0 ? account.upload : account.download).charge(n, now: now)
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
            if dir.pointee.reading == .idle && dir.pointee.queuedBuffer == Direction.noBuffer && dir.pointee.writing != .waitingForRoom {
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

    // MARK: - Closing

    /// A socket of a bridging connection failed (reset, broken pipe, or a dead peer: keepalive
    /// and TCP_USER_TIMEOUT report ETIMEDOUT, or the route's error): abort the other side too.
    func peerFailed(_ s: Int32, _ result: Int32) {
        let e = -result
        if e == ETIMEDOUT || e == EHOSTUNREACH || e == ENETUNREACH || e == EHOSTDOWN {
            statistics.add(.deadPeers)
            closeSlot(s, abort: true, reason: .deadPeer)
        } else {
            closeSlot(s, abort: true)
        }
    }

    /// Closes both sockets (RST when `abort`), cancelling what is pending on them; the slot
    /// is reused once every operation on it has completed.
    func closeSlot(_ s: Int32, abort: Bool, reason: CloseReason? = nil) {
        let p = table.pointer(s)
        guard p.pointee.state != .closing && p.pointee.state != .free else { return }
        if p.pointee.closeReason == .unknown {
            p.pointee.closeReason = reason ?? (abort ? .reset : p.pointee.state == .negotiating ? .clientGone : .unknown)
        }
        if p.pointee.timerBucket >= 0 { wheel.cancel(s, table: table) }
        if abort && p.pointee.state == .bridging { statistics.add(.closedAborted) }
        endHandshakeCount(s, p)  // at once: a newcomer may be waiting for this place
        if p.pointee.state == .associated { closeAssociation(s, p) }
        p.pointee.state = .closing
        for d in 0..<2 {
            let dir = direction(p, d)
            if dir.pointee.reading == .waitingForBuffer { dir.pointee.reading = .idle }
            returnBuffer(dir.pointee.queuedBuffer)
            dir.pointee.queuedBuffer = Direction.noBuffer
            // A buffer being sent goes back when its send completes (the kernel reads it).
        }
        if p.pointee.client >= 0 { closeSocket(s, p, 0, abort: abort) }
        if p.pointee.upstream >= 0 { closeSocket(s, p, 1, abort: abort) }
        if p.pointee.inflight == 0 { finish(s) }
    }

    /// Closes the client (`side` 0) or upstream (1) socket, naming what is pending on it so
    /// the backend can cancel exactly that: the read side of the direction it is the source
    /// of, the write side of the one it is the destination of, a negotiation poll or connect.
    private func closeSocket(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ side: Int, abort: Bool) {
        let fd = side == 0 ? p.pointee.client : p.pointee.upstream
        var pending = PendingOperations(read: direction(p, side).pointee.pendingRead(token(s, .none, side)),
                                        write: direction(p, 1 - side).pointee.pendingWrite(token(s, .none, 1 - side)))
        if side == 0 && p.pointee.negotiationPollArmed { pending.read = token(s, .negotiationReadable) }
        if side == 1 && p.pointee.connectArmed { pending.write = token(s, .connect) }
        if side == 1 && p.pointee.tls & TLSSides.upstreamPollArmed != 0 { pending.read = token(s, .negotiationReadable, 1) }
        p.pointee.inflight += 1
        backend.close(fd: fd, pending: pending, abort: abort, token: token(s, .close, side))
    }

    func finish(_ s: Int32) {
        let p = table.pointer(s)
        if let accessLogger { logAccess(s, p, accessLogger) }
        if p.pointee.tls != 0 {
            clientTLS[s] = nil
            upstreamTLS[s] = nil
            p.pointee.tls = 0
        }
        for d in 0..<2 {
            let dir = direction(p, d)
            guard dir.pointee.pipeRead >= 0 else { continue }
            // Nothing is in flight now. Bytes left in the pipe of an aborted bridge are lost
            // with it: counted, and the pipe is closed rather than reused.
            if dir.pointee.pipeBytes > 0 { statistics.add(.spliceBytesDropped, Int64(dir.pointee.pipeBytes)) }
            pipes.giveBack(PipePool.Pipe(read: dir.pointee.pipeRead, write: dir.pointee.pipeWrite), empty: dir.pointee.pipeBytes == 0)
            dir.pointee.pipeRead = -1
            dir.pointee.pipeWrite = -1
        }
        if p.pointee.session >= 0 { releaseNegotiation(p) }
        releaseSourceCount(s, p)
        if p.pointee.framedUpload {
            uploadFramings[s] = nil
            p.pointee.framedUpload = false
        }
        if p.pointee.user >= 0 {
            accounts[Int(p.pointee.user)].releaseConnection()
            p.pointee.user = -1
        }
        if p.pointee.server >= 0 {
            listeners[Int(p.pointee.listener)].pool?.release(Int(p.pointee.server))
            p.pointee.server = -1
        }
        statistics.add(listener: listeners[Int(p.pointee.listener)].bound.index, .active, -1)
        listeners[Int(p.pointee.listener)].bound.budget?.release()
        table.release(s)
        budget.release()
        statistics.add(.activeConnections, -1)
        roomFreed()
    }
}
