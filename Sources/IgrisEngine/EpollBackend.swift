import Glibc
import CLinux

/// The epoll backend: emulates completions with edge-triggered readiness and
/// non-blocking syscalls, so the worker runs the same state machine on both backends.
///
/// Every fd is registered once (IN|OUT|RDHUP, edge-triggered) when its first operation is
/// queued; what epoll last said about it is kept per fd (`readable`, `writable`), so a recv
/// or send queued while the fd is known ready runs at once, and one queued while it is not
/// waits for the next edge. The cache is only right because this backend issues every read
/// and write on its sockets itself (the synchronous calls included): whichever of them sees
/// EAGAIN clears the flag, and only an edge sets it again. Results are queued as completions
/// and handed out by the next `drainCompletions`, never from inside the call that queued the
/// operation.
public final class EpollBackend: IOBackend {
    public let buffers: BufferPool
    public let completionOverflows: UInt64 = 0
    public private(set) var cancellations: UInt64 = 0

    /// What one fd is waiting for. Indexed by fd number; grows (rarely) with the highest fd.
    private struct FDState {
        var registered = false
        var readable = false
        var writable = false
        var acceptToken: UInt64 = 0
        var acceptOnce = false
        var recvToken: UInt64 = 0
        /// Bytes the queued recv may take at most (0: a whole buffer).
        var recvLimit: Int32 = 0
        /// The queued recv takes a reserve buffer.
        var recvReserve = false
        var sendToken: UInt64 = 0
        var connectToken: UInt64 = 0
        var pollToken: UInt64 = 0
        var pollWritableToken: UInt64 = 0
        var sendBuffer: UInt16 = 0
        var sendOffset: Int32 = 0
        var sendLength: Int32 = 0
        var inRetryList = false
        /// Accepts since the worker last took its completions (`batch` then): at most
        /// `acceptsPerTurn` between two deliveries, however many times the listener is run.
        var acceptBatch: UInt32 = 0
        var acceptedInBatch = 0
        /// A listening socket: it may be shared with another process (a hand-off), so closing
        /// our descriptor does not end its epoll registration.
        var isListener = false
    }

    private let epfd: Int32
    private var fds: [FDState]
    private var ready: [Completion]
    private var delivering: [Completion]
    private var retry: [Int32]       // listeners with more connections than one turn accepts
    private let events: UnsafeMutablePointer<epoll_event>
    private let eventCapacity: Int32 = 256
    private let acceptsPerTurn = 64
    /// Counts `drainCompletions` calls: what is accepted between two belongs to one batch.
    private var batch: UInt32 = 1

    public init(configuration: BackendConfiguration) throws(SyscallError) {
        let fd = epoll_create1(Int32(EPOLL_CLOEXEC))
        if fd < 0 { throw SyscallError("epoll_create1", errno: igris_errno()) }
        epfd = fd
        do {
            buffers = try BufferPool(size: configuration.bufferSize, count: configuration.bufferCount,
                                     initialActive: configuration.initialBufferCount)
        } catch {
            Syscall.close(fd)
            throw error
        }
        fds = Array(repeating: FDState(), count: 1024)
        ready = []
        ready.reserveCapacity(1024)
        delivering = []
        delivering.reserveCapacity(1024)
        retry = []
        events = .allocate(capacity: Int(eventCapacity))
    }

    deinit {
        Syscall.close(epfd)
        events.deallocate()
    }

    @inline(__always)
    private func state(_ fd: Int32) -> Int {
        let i = Int(fd)
        if i >= fds.count {
            fds.append(contentsOf: repeatElement(FDState(), count: max(i + 1 - fds.count, fds.count)))
        }
        if !fds[i].registered {
            var ev = epoll_event()
            ev.events = EPOLLIN.rawValue | EPOLLOUT.rawValue | EPOLLRDHUP.rawValue | EPOLLET.rawValue
            ev.data.u64 = UInt64(UInt32(bitPattern: fd))
            if epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) == 0 {
                fds[i].registered = true
            } else {
                // Not pollable (closed under us): let the operation fail on its own syscall.
                fds[i].readable = true
                fds[i].writable = true
            }
        }
        return i
    }

    @inline(__always)
    private func complete(_ token: UInt64, _ result: Int32, buffer: UInt16? = nil, more: Bool = false) {
        ready.append(Completion(token: OperationToken(raw: token), result: result, bufferID: buffer, more: more))
    }

    /// One turn's accepts: the worker sees each before the next turn.
    public var acceptBurst: Int { acceptsPerTurn }

    public func accept(listener fd: Int32, multishot: Bool, token: OperationToken) {
        let i = state(fd)
        fds[i].isListener = true
        fds[i].acceptToken = token.raw
        fds[i].acceptOnce = !multishot
        // A re-armed listener may already hold connections whose edge was consumed.
        runAccepts(fd)
    }

    private func runAccepts(_ fd: Int32) {
        let i = Int(fd)
        // One listener may run several times before the worker sees what it took (armed from
        // a completion, then readable, then retried): the bound is per delivered batch, as
        // the worker's room check (`Worker.multishotMinimumRoom`) assumes.
        if fds[i].acceptBatch != batch {
            fds[i].acceptBatch = batch
            fds[i].acceptedInBatch = 0
        }
        while fds[i].acceptToken != 0 {
            if fds[i].acceptedInBatch >= acceptsPerTurn {
                if !fds[i].inRetryList { fds[i].inRetryList = true; retry.append(fd) }
                return
            }
            let c = Syscall.accept(fd)
            if c >= 0 {
                fds[i].acceptedInBatch += 1
                if fds[i].acceptOnce {
                    let token = fds[i].acceptToken
                    fds[i].acceptToken = 0
                    complete(token, c)
                    return
                }
                complete(fds[i].acceptToken, c, more: true)
                // Descriptors are numbered lowest-free first, so at most `limit - c - 1` are
                // left. Each client accepted in this batch needs one more for its upstream: when
                // they would take the rest, go on next turn, once the worker has opened those
                // (a burst from the backlog must not leave clients with no upstream possible).
                if Syscall.descriptorLimit - Int(c) - 1 <= fds[i].acceptedInBatch + 1 {
                    if !fds[i].inRetryList { fds[i].inRetryList = true; retry.append(fd) }
                    return
                }
            } else if c == -EAGAIN {
                fds[i].readable = false  // the backlog is empty
                return
            } else if c != -ECONNABORTED {
                // Like io_uring's multishot accept, an error ends the multishot.
                let token = fds[i].acceptToken
                fds[i].acceptToken = 0
                complete(token, c)
                return
            }
        }
    }

    public func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, token: OperationToken) {
        let i = state(fd)
        let rc = Syscall.connect(fd, address, length)
        if rc == -EINPROGRESS {
            fds[i].connectToken = token.raw
        } else {
            complete(token.raw, rc)
        }
    }

    public func recv(fd: Int32, limit: Int, reserve: Bool, token: OperationToken) {
        let i = state(fd)
        fds[i].recvToken = token.raw
        fds[i].recvLimit = Int32(limit)
        fds[i].recvReserve = reserve
        if fds[i].readable { runRecv(i) }
    }

    private func runRecv(_ i: Int) {
        let token = fds[i].recvToken
        guard let id = fds[i].recvReserve ? buffers.takeReserve() : buffers.take() else {
            fds[i].recvToken = 0
            complete(token, -ENOBUFS)
            return
        }
        let limit = Int(fds[i].recvLimit)
        let n = Syscall.recv(Int32(i), buffers.pointer(id), limit > 0 && limit < buffers.size ? limit : buffers.size)
        if n > 0 {
            fds[i].recvToken = 0
            buffers.markLent(id)
            complete(token, Int32(n), buffer: id)
            return
        }
        buffers.putBack(id)
        if n == -Int(EAGAIN) { fds[i].readable = false; return }
        fds[i].recvToken = 0
        complete(token, Int32(n))   // 0 (EOF) or -errno
    }

    public func send(fd: Int32, buffer: UInt16, offset: Int, length: Int, token: OperationToken) {
        let i = state(fd)
        fds[i].sendToken = token.raw
        fds[i].sendBuffer = buffer
        fds[i].sendOffset = Int32(offset)
        fds[i].sendLength = Int32(length)
        if fds[i].writable { runSend(i) }
    }

    private func runSend(_ i: Int) {
        let p = buffers.pointer(fds[i].sendBuffer) + Int(fds[i].sendOffset)
        let n = Syscall.send(Int32(i), p, Int(fds[i].sendLength))
        if n == -Int(EAGAIN) { fds[i].writable = false; return }
        let token = fds[i].sendToken
        fds[i].sendToken = 0
        complete(token, Int32(n))
    }

    public func shutdownWrite(fd: Int32, token: OperationToken) {
        complete(token.raw, Syscall.shutdown(fd, Int32(SHUT_WR)))
    }

    public func stopAccepting(listener fd: Int32, token: OperationToken) {
        cancelAll(fd)
    }

    /// Completes whatever waits on `fd` with -ECANCELED.
    private func cancelAll(_ fd: Int32) {
        let i = Int(fd)
        guard i < fds.count else { return }
        for t in [fds[i].acceptToken, fds[i].recvToken, fds[i].sendToken, fds[i].connectToken, fds[i].pollToken,
                  fds[i].pollWritableToken] where t != 0 {
            complete(t, -ECANCELED)
            cancellations &+= 1
        }
        fds[i].acceptToken = 0
        fds[i].recvToken = 0
        fds[i].sendToken = 0
        fds[i].connectToken = 0
        fds[i].pollToken = 0
        fds[i].pollWritableToken = 0
        if fds[i].inRetryList, let r = retry.firstIndex(of: fd) {
            retry.remove(at: r)
            fds[i].inRetryList = false
        }
    }

    /// Everything pending on `fd` is known here, so `pending` is not needed to find it.
    public func close(fd: Int32, pending: PendingOperations, abort: Bool, token: OperationToken) {
        cancelAll(fd)
        if Int(fd) < fds.count {
            // close() removes a socket from the epoll set only when its last descriptor closes:
            // a listener handed to a successor (or reused by a reload) lives on elsewhere.
            if fds[Int(fd)].isListener && fds[Int(fd)].registered {
                var ev = epoll_event()
                _ = epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &ev)
            }
            fds[Int(fd)] = FDState()
        }
        if abort { Syscall.setLingerZero(fd) }
        // Connection sockets are never shared, so close() removes them from the epoll set.
        // Splices run inline here, so none can be pending on it.
        Syscall.close(fd)
        complete(token.raw, 0)
    }

    public func pollReadable(fd: Int32, token: OperationToken) {
        let i = state(fd)
        if fds[i].readable {
            complete(token.raw, Int32(POLLIN))
        } else {
            fds[i].pollToken = token.raw
        }
    }

    public func pollWritable(fd: Int32, token: OperationToken) {
        let i = state(fd)
        // The cache is cleared only by an EAGAIN, and a worker that reads no more than the
        // destination takes never sees one: ask the socket. Its poll also arms the wake-up
        // (SOCK_NOSPACE) that makes the next edge come when room frees.
        if fds[i].writable && !Syscall.isWritable(fd) { fds[i].writable = false }
        if fds[i].writable {
            complete(token.raw, Int32(POLLOUT))
        } else {
            fds[i].pollWritableToken = token.raw
        }
    }

    public func peek(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int {
        let n = Syscall.peek(fd, buffer, length)
        if n == -Int(EAGAIN) { noteDrained(fd) }
        return n
    }

    public func receiveNow(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int {
        let n = Syscall.recv(fd, buffer, length, flags: Int32(MSG_DONTWAIT))
        if n == -Int(EAGAIN) { noteDrained(fd) }
        return n
    }

    public func sendNow(fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int {
        let n = Syscall.send(fd, bytes.baseAddress!, bytes.count)
        if n == -Int(EAGAIN), Int(fd) < fds.count { fds[Int(fd)].writable = false }
        return n
    }

    public func shutdown(fd: Int32, how: Int32) -> Int32 {
        Syscall.shutdown(fd, how)
    }

    @inline(__always)
    public func armDatagramReceive(fd: Int32, token: OperationToken) -> Bool { false }
    public func datagram(_ buffer: UInt16, length: Int) -> ReceivedDatagram? { nil }
    public func releaseDatagram(_ buffer: UInt16) {}

    public func receiveDatagrams(fd: Int32, into batch: DatagramBatch) -> Int {
        let n = batch.receive(fd)
        // Fewer than the batch holds: the socket is drained (a datagram arriving since makes
        // a new edge, seen at the next wait).
        if n < batch.slots { noteDrained(fd) }
        return n
    }

    public func sendDatagrams(fd: Int32, from batch: DatagramBatch, bytes: inout Int) -> Int { batch.send(fd, bytes: &bytes) }

    private func noteDrained(_ fd: Int32) {
        if Int(fd) < fds.count { fds[Int(fd)].readable = false }
    }

    public func spliceIn(socket: Int32, pipe: Int32, length: Int, token: OperationToken) {
        _ = state(socket)  // registered, so the edge that ends a wait comes
        let n = Syscall.splice(from: socket, to: pipe, length: length)
        // EAGAIN is either side: an empty socket, or a pipe whose slots are all taken (each
        // holds a fragment, so a pipe can be full with fewer bytes than its size; a full pipe
        // says EAGAIN before the socket is looked at). Only the first means no edge-worthy
        // input is left; clearing the flag for the second would wait for an edge that never
        // comes: the bytes, or the end of stream with none left, are already there. A one-byte
        // `peek` tells them apart: it clears the flag only when it says EAGAIN too.
        if n == -Int(EAGAIN) {
            var byte: UInt8 = 0
            _ = peek(fd: socket, into: &byte, length: 1)
        }
        complete(token.raw, Int32(n))
    }

    public func spliceOut(pipe: Int32, socket: Int32, length: Int, token: OperationToken) {
        let i = state(socket)
        let n = Syscall.splice(from: pipe, to: socket, length: length)
        if n == -Int(EAGAIN) { fds[i].writable = false }
        complete(token.raw, Int32(n))
    }

    public func consumeWake(fd: Int32) {
        Syscall.drainEventFD(fd)
        if Int(fd) < fds.count { fds[Int(fd)].readable = false }
    }

    @inline(__always)
    public func releaseBuffer(_ id: UInt16) {
        buffers.returnToStack(id)
    }

    public func adjustBuffers() {
        buffers.adjustTarget()
        buffers.shrinkFreeStack()
    }

    public func waitForCompletions(timeoutNanoseconds: UInt64?) throws(SyscallError) {
        var timeoutMs: Int32
        if !ready.isEmpty || !retry.isEmpty {
            timeoutMs = 0
        } else if let ns = timeoutNanoseconds {
            // Round up so a timer due in 0.3 ms doesn't become a busy 0 ms wait.
            timeoutMs = Int32(min((ns + 999_999) / 1_000_000, UInt64(Int32.max)))
        } else {
            timeoutMs = -1
        }
        let n = epoll_wait(epfd, events, eventCapacity, timeoutMs)
        if n < 0 {
            let e = igris_errno()
            if e == EINTR { return }
            throw SyscallError("epoll_wait", errno: e)
        }
        for k in 0..<Int(n) {
            let ev = events[k]
            let i = Int(ev.data.u64)
            guard i < fds.count, fds[i].registered else { continue }
            let bits = ev.events
            if bits & (EPOLLIN.rawValue | EPOLLRDHUP.rawValue | EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
                fds[i].readable = true
                if fds[i].acceptToken != 0 { runAccepts(Int32(i)) }
                if fds[i].recvToken != 0 { runRecv(i) }
                if fds[i].pollToken != 0 {
                    let t = fds[i].pollToken
                    fds[i].pollToken = 0
                    complete(t, Int32(POLLIN))
                }
            }
            if bits & (EPOLLOUT.rawValue | EPOLLHUP.rawValue | EPOLLERR.rawValue) != 0 {
                fds[i].writable = true
                if fds[i].connectToken != 0 {
                    let t = fds[i].connectToken
                    fds[i].connectToken = 0
                    complete(t, -Syscall.socketError(Int32(i)))
                }
                if fds[i].sendToken != 0 { runSend(i) }
                if fds[i].pollWritableToken != 0 {
                    let t = fds[i].pollWritableToken
                    fds[i].pollWritableToken = 0
                    complete(t, Int32(POLLOUT))
                }
            }
        }
        if !retry.isEmpty {
            let listeners = retry
            retry.removeAll(keepingCapacity: true)
            for fd in listeners {
                fds[Int(fd)].inRetryList = false
                runAccepts(fd)
            }
        }
    }

    /// epoll has no table of its own: every socket is a regular descriptor.
    public func makeDirect(client: Int32, upstream: Int32) -> (client: Int32, upstream: Int32)? { nil }

    public var directCapacity: Int { 0 }

    public var hasCompletions: Bool { !ready.isEmpty }

    public func drainCompletions(_ body: (Completion) -> Void) {
        // Completions queued by operations that `body` issues go to the next turn.
        // One batch per turn, so a flow whose syscalls keep succeeding at once cannot starve
        // timers or other fds.
        swap(&ready, &delivering)
        batch &+= 1
        // An index loop: for-in over an array allocates an iterator frame in debug builds.
        var k = 0
        while k < delivering.count {
            body(delivering[k])
            k += 1
        }
        delivering.removeAll(keepingCapacity: true)
    }
}
