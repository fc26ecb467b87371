import Glibc

/// The splice path of a direction: wait for input, socket → pipe, pipe → socket, wait for
/// room. A pipe is borrowed only while bytes are in it, so an idle direction holds none.
extension Worker {
    /// Wait for the source to have input before taking a pipe and splicing: an idle
    /// direction holds no pipe, and no splice waits on an empty socket.
    func armPollIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.reading = .pollIn
        p.pointee.inflight += 1
        backend.pollReadable(fd: dir.pointee.source, token: token(s, .pollIn, d))
    }

    private func armSpliceIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.reading = .spliceIn
        p.pointee.inflight += 1
        backend.spliceIn(socket: dir.pointee.source, pipe: dir.pointee.pipeWrite,
                         length: pipes.capacity - Int(dir.pointee.pipeBytes), token: token(s, .spliceIn, d))
    }

    private func armSpliceOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.writing = .spliceOut
        p.pointee.inflight += 1
        backend.spliceOut(pipe: dir.pointee.pipeRead, socket: dir.pointee.destination,
                          length: Int(dir.pointee.pipeBytes), token: token(s, .spliceOut, d))
    }

    private func armPollOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.writing = .pollOut
        p.pointee.inflight += 1
        backend.pollWritable(fd: dir.pointee.destination, token: token(s, .pollOut, d))
    }

    /// The pipe goes back once it is empty and no splice is using it.
    @inline(__always)
    private func releasePipeIfIdle(_ dir: UnsafeMutablePointer<Direction>) {
        guard dir.pointee.pipeRead >= 0, dir.pointee.pipeBytes == 0, dir.pointee.reading != .spliceIn,
              dir.pointee.writing != .spliceOut && dir.pointee.writing != .pollOut else { return }
        pipes.giveBack(PipePool.Pipe(read: dir.pointee.pipeRead, write: dir.pointee.pipeWrite), empty: true)
        dir.pointee.pipeRead = -1
        dir.pointee.pipeWrite = -1
    }

    func onPollIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.reading = .idle
        guard p.pointee.state == .bridging else { return }
        if result < 0 { peerFailed(s, result); return }
        if dir.pointee.pipeRead < 0 {
            guard let pipe = pipes.borrow() else {
                // No pipe to be had (budget, descriptors, pipe-user-pages-soft): this
                // direction stays on copy; the connection never fails for it.
                dir.pointee.path = .copy
                statistics.add(.pipeFallbacks)
                armRecv(s, p, d)
                return
            }
            dir.pointee.pipeRead = pipe.read
            dir.pointee.pipeWrite = pipe.write
        }
        armSpliceIn(s, p, d)
    }

    func onSpliceIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.reading = .idle
        // Kept exact even while closing: it decides whether the pipe may be reused.
        if result > 0 { dir.pointee.pipeBytes += UInt32(result) }
        guard p.pointee.state == .bridging else { return }
        if result > 0 {
            countBytes(s, p, d, UInt32(result))
            if p.pointee.user >= 0 { _ = accountBytes(s, p, d, Int(result)) }
            if dir.pointee.writing == .idle { armSpliceOut(s, p, d) }
            // A full pipe waits for the writer; reading resumes as it drains.
            if Int(dir.pointee.pipeBytes) < pipes.capacity { armPollIn(s, p, d) }
            return
        }
        if result == 0 {
            dir.pointee.reading = .eof
            if dir.pointee.pipeBytes == 0 && dir.pointee.writing == .idle {
                releasePipeIfIdle(dir)
                queueShutdown(s, p, d)
            }
            return
        }
        guard result == -EAGAIN else {
            peerFailed(s, result)
            return
        }
        statistics.add(.spliceWouldBlock)
        // With bytes in the pipe, EAGAIN may mean the pipe has no free slot (each holds a
        // fragment, so it can be full below its byte size): reading resumes when the
        // splice-out in flight drains it. Polling now would only find the same full pipe.
        guard dir.pointee.pipeBytes == 0 else { return }
        releasePipeIfIdle(dir)
        armPollIn(s, p, d)
    }

    func onSpliceOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.writing = .idle
        if result > 0 { dir.pointee.pipeBytes -= UInt32(result) }
        guard p.pointee.state == .bridging else { return }
        if result > 0 {
            statistics.add(.spliceBytes, Int64(result))
            if dir.pointee.pipeBytes > 0 {
                armSpliceOut(s, p, d)
            } else if dir.pointee.reading == .eof {
                releasePipeIfIdle(dir)
                queueShutdown(s, p, d)
                return
            } else {
                releasePipeIfIdle(dir)
            }
            if dir.pointee.reading == .idle && Int(dir.pointee.pipeBytes) < pipes.capacity { armPollIn(s, p, d) }
            return
        }
        if result == -EAGAIN {
            statistics.add(.spliceWouldBlock)
            armPollOut(s, p, d)
            return
        }
        peerFailed(s, result)  // EPIPE, ECONNRESET, a dead peer, or 0 with bytes still in the pipe
    }

    func onPollOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        direction(p, d).pointee.writing = .idle
        guard p.pointee.state == .bridging else { return }
        if result < 0 { peerFailed(s, result); return }
        armSpliceOut(s, p, d)
    }
}
