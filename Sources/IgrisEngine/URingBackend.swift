import Glibc
import CURing
import CLinux

/// The io_uring backend: one ring per worker, created on the worker's own thread.
///
/// - Setup flags: `SINGLE_ISSUER|DEFER_TASKRUN` (6.1+) when accepted, else `COOP_TASKRUN`
///   (5.19+), else none; the CQ is sized at 8× the SQ so multishot accept bursts fit, and
///   the kernel's overflow counter is watched (with `IORING_FEAT_NODROP` nothing is lost,
///   but an overflow means the CQ is too small, so it is counted).
/// - recv selects from a provided buffer ring (group 0) holding every pool buffer; a send
///   goes out of the same buffer; the buffer returns to the ring when the send completes.
/// - Each loop turn is one `io_uring_enter` that both submits and waits.
/// - Closing cancels the operations its caller names by their user_data: a lookup, where
///   cancelling by descriptor scans every pending request of the ring (O(open connections)
///   per close).
/// - Splices are plain non-blocking splice(2) calls, completed at the next drain: the worker
///   only splices after a poll said the source is readable (or the destination writable),
///   and IORING_OP_SPLICE always runs on an io-wq thread — two context switches and a
///   cross-CPU hand-off per splice, a third more CPU per GB forwarded and a third more
///   latency per round trip than the syscall from the worker's own thread.
public final class URingBackend: IOBackend {
    public let buffers: BufferPool
    /// Set-up flags the kernel accepted, for the start-up log.
    public let setupDescription: String

    private let ring: UnsafeMutablePointer<io_uring>
    private let bufferRing: UnsafeMutableRawPointer
    /// The reserve's ring (group 1), in the same mapping after the main one's pages.
    private let reserveRing: UnsafeMutableRawPointer
    private let bufferRingBytes: Int
    /// UDP associations' datagrams (group 2), made with the first one.
    private var datagramRing: URingDatagramRing?
    private let bufferGroup: UInt16 = 0
    private let reserveGroup: UInt16 = 1
    private let batch: UnsafeMutablePointer<igris_completion>
    private let batchCapacity: UInt32 = 512
    private var droppedSeen: UInt32 = 0
    public private(set) var completionOverflows: UInt64 = 0
    public private(set) var cancellations: UInt64 = 0
    /// Sends this large or larger go out with IORING_OP_SEND_ZC.
    private let zeroCopyThreshold: Int
    /// The pool is registered as fixed buffer 0 (else SEND_ZC passes plain addresses).
    private var poolRegistered = false
    /// Why zero-copy sends are off or how they run, for the start-up log.
    public private(set) var zeroCopyDescription = "off"

    /// user_data of cancel requests.
    private static let cancelTag: UInt64 = .max - 1
    /// SEND_ZC: a send's result, held from its first completion until the notification
    /// that the kernel let go of the buffer (capacity reserved: no allocation per send).
    private var zeroCopyResults: [UInt64: Int32] = [:]
    /// Operations done with a plain syscall, delivered by the next drain (never from inside
    /// the call that queued them), and the batch being delivered.
    private var immediate: [Completion] = []
    private var delivering: [Completion] = []

    /// Direct descriptors (`BackendConfiguration.directDescriptors`), when the table was had.
    private var direct: URingDirectDescriptors?
    /// How direct descriptors run here, or why not, for the start-up log and `igris probe`.
    public private(set) var directDescription = "off"
    public var directCapacity: Int { direct?.capacity ?? 0 }
    /// An aborted direct socket is reset (setsockopt through the ring), not closed with a FIN.
    public var directAbortsWithReset: Bool { direct?.abortsWithReset ?? false }

    public init(configuration: BackendConfiguration) throws(SyscallError) {
        ring = .allocate(capacity: 1)
        ring.initialize(to: io_uring())
        var description = ""
        var rc: Int32 = -EINVAL
        let base = UInt32(IORING_SETUP_CQSIZE) | UInt32(IORING_SETUP_SUBMIT_ALL)
        let attempts: [(UInt32, String)] = [
            (UInt32(IORING_SETUP_SINGLE_ISSUER) | UInt32(IORING_SETUP_DEFER_TASKRUN), "SINGLE_ISSUER|DEFER_TASKRUN"),
            (UInt32(IORING_SETUP_COOP_TASKRUN), "COOP_TASKRUN"),
            (0, "no task-run flags"),
        ]
        for (flags, name) in attempts {
            var params = io_uring_params()
            params.flags = base | flags
            params.cq_entries = configuration.ringEntries * 8
            rc = io_uring_queue_init_params(configuration.ringEntries, ring, &params)
            if rc == 0 { description = name; break }
            if rc != -EINVAL { break }  // EINVAL: flag unknown to this kernel, try fewer
        }
        if rc != 0 {
            ring.deallocate()
            throw SyscallError("io_uring_setup", errno: -rc)
        }
        // io_uring_enter then skips the ring descriptor's lookup in the (shared, multi-threaded)
        // descriptor table on every call. Per thread: it is registered by the worker that uses it.
        if io_uring_register_ring_fd(ring) == 1 { description += ", registered ring fd" }
        setupDescription = description

        do {
            buffers = try BufferPool(size: configuration.bufferSize, count: configuration.bufferCount,
                                     initialActive: configuration.initialBufferCount)
        } catch {
            io_uring_queue_exit(ring)
            ring.deallocate()
            throw error
        }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let mainBytes = (configuration.bufferCount * igris_buf_ring_entry_size() + page - 1) / page * page
        let reserveEntries = max(1, buffers.reserveCount)
        let bytes = mainBytes + (reserveEntries * igris_buf_ring_entry_size() + page - 1) / page * page
        guard let mem = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), mem != UnsafeMutableRawPointer(bitPattern: -1) else {
            io_uring_queue_exit(ring)
            ring.deallocate()
            throw SyscallError("mmap(buffer ring)", errno: igris_errno())
        }
        bufferRing = mem
        reserveRing = mem + mainBytes
        bufferRingBytes = bytes
        var reg = igris_uring_register_buf_ring(ring, mem, UInt32(configuration.bufferCount), bufferGroup)
        if reg == 0 && buffers.reserveCount > 0 {
            reg = igris_uring_register_buf_ring(ring, reserveRing, UInt32(reserveEntries), reserveGroup)
        }
        if reg != 0 {
            munmap(mem, bytes)
            io_uring_queue_exit(ring)
            ring.deallocate()
            throw SyscallError("io_uring_register_buf_ring", errno: -reg)
        }
        let (main, reserve) = buffers.takeInitialFree()
        for id in main { igris_buf_ring_recycle(mem, UInt32(configuration.bufferCount), buffers.pointer(id), UInt32(configuration.bufferSize), id) }
        for id in reserve { igris_buf_ring_recycle(reserveRing, UInt32(reserveEntries), buffers.pointer(id), UInt32(configuration.bufferSize), id) }
        batch = .allocate(capacity: Int(batchCapacity))
        zeroCopyThreshold = configuration.zeroCopySendThreshold ?? .max
        zeroCopyResults.reserveCapacity(configuration.bufferCount)
        immediate.reserveCapacity(1024)
        delivering.reserveCapacity(1024)
        if configuration.zeroCopySendThreshold != nil {
            // Registered buffers count against RLIMIT_MEMLOCK: without room, SEND_ZC still
            // works from unregistered memory (the kernel pins pages per send instead).
            let rc = igris_uring_register_region(ring, buffers.base, configuration.bufferSize * configuration.bufferCount)
            poolRegistered = rc == 0
            zeroCopyDescription = rc == 0 ? "SEND_ZC from registered buffers" : "SEND_ZC, pool not registered (\(Errno.describe(-rc)))"
        }
        // Operations the kernel punts to io-wq threads: cap them (bounded, unbounded) so a burst
        // can't spawn a thread per connection. Best effort (5.15+).
        var maxWorkers: [UInt32] = [2, 4]
        _ = maxWorkers.withUnsafeMutableBufferPointer { io_uring_register_iowq_max_workers(ring, $0.baseAddress) }
        if configuration.directDescriptors >= 2 {
            switch URingDirectDescriptors.make(ring: ring, entries: configuration.directDescriptors, ignoredTag: Self.cancelTag) {
            case .success(let table):
                direct = table
                directDescription = table.description
            case .failure(let error):
                directDescription = "off (\(error))"
            }
        }
    }

    deinit {
        io_uring_queue_exit(ring)
        datagramRing = nil
        munmap(bufferRing, bufferRingBytes)
        ring.deallocate()
        batch.deallocate()
    }

    public func makeDirect(client: Int32, upstream: Int32) -> (client: Int32, upstream: Int32)? {
        direct?.move(client: client, upstream: upstream) { nextSQE($0) }
    }

    /// Points `sqe` at a direct descriptor's table entry (a regular descriptor stays as prepared).
    @inline(__always)
    private func target(_ sqe: UnsafeMutablePointer<io_uring_sqe>, _ fd: Int32) {
        if DirectDescriptor.isDirect(fd) { igris_sqe_fixed_file(sqe, DirectDescriptor.entry(fd)) }
    }

    /// A free SQE; when the SQ is full, what is queued is submitted first.
    @inline(__always)
    private func nextSQE(_ needed: UInt32 = 1) -> UnsafeMutablePointer<io_uring_sqe> {
        if io_uring_sq_space_left(ring) < needed {
            _ = io_uring_submit(ring)
        }
        // Cannot fail: the SQ was just flushed and is at least `needed` entries long.
        return io_uring_get_sqe(ring)!
    }

    public func accept(listener fd: Int32, multishot: Bool, token: OperationToken) {
        let sqe = nextSQE()
        if multishot {
            io_uring_prep_multishot_accept(sqe, fd, nil, nil, Int32(SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue))
        } else {
            io_uring_prep_accept(sqe, fd, nil, nil, Int32(SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue))
        }
        io_uring_sqe_set_data64(sqe, token.raw)
    }

    /// Everything in the backlog: the kernel's multishot accept loops while the listener's
    /// queue is not empty, all within one io_uring_enter.
    public var acceptBurst: Int { .max }

    public func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, token: OperationToken) {
        let sqe = nextSQE()
        io_uring_prep_connect(sqe, fd, address, length)
        target(sqe, fd)
        io_uring_sqe_set_data64(sqe, token.raw)
    }

    public func recv(fd: Int32, limit: Int, reserve: Bool, token: OperationToken) {
        let sqe = nextSQE()
        // With a selected buffer, the length caps the read (0: the whole buffer).
        io_uring_prep_recv(sqe, fd, nil, limit > 0 && limit < buffers.size ? limit : 0, 0)
        igris_sqe_select_buffer(sqe, reserve ? reserveGroup : bufferGroup)
        target(sqe, fd)
        io_uring_sqe_set_data64(sqe, token.raw)
    }

    public func send(fd: Int32, buffer: UInt16, offset: Int, length: Int, token: OperationToken) {
        let sqe = nextSQE()
        if length >= zeroCopyThreshold {
            if poolRegistered {
                io_uring_prep_send_zc_fixed(sqe, fd, buffers.pointer(buffer) + offset, length, Int32(MSG_NOSIGNAL), 0, 0)
            } else {
                io_uring_prep_send_zc(sqe, fd, buffers.pointer(buffer) + offset, length, Int32(MSG_NOSIGNAL), 0)
            }
        } else {
            io_uring_prep_send(sqe, fd, buffers.pointer(buffer) + offset, length, Int32(MSG_NOSIGNAL))
        }
        target(sqe, fd)
        io_uring_sqe_set_data64(sqe, token.raw)
    }

    /// Run at once, completed at the next drain: IORING_OP_SHUTDOWN is always punted to an
    /// io-wq thread (a context switch or two per half-close), while shutdown(SHUT_WR) on a TCP
    /// socket never blocks. The caller queues it only once nothing is being sent on `fd`.
    /// A direct descriptor has no syscall to take: the ring's shutdown.
    public func shutdownWrite(fd: Int32, token: OperationToken) {
        guard DirectDescriptor.isDirect(fd) else {
            immediate.append(Completion(token: token, result: Syscall.shutdown(fd, Int32(SHUT_WR))))
            return
        }
        let sqe = nextSQE()
        io_uring_prep_shutdown(sqe, 0, Int32(SHUT_WR))
        target(sqe, fd)
        io_uring_sqe_set_data64(sqe, token.raw)
    }

    public func stopAccepting(listener fd: Int32, token: OperationToken) {
        cancel(token)
    }

    @inline(__always)
    private func cancel(_ token: OperationToken) {
        guard !token.isNone else { return }
        let sqe = nextSQE()
        io_uring_prep_cancel64(sqe, token.raw, 0)
        io_uring_sqe_set_data64(sqe, Self.cancelTag)
        cancellations &+= 1
    }

    public func close(fd: Int32, pending: PendingOperations, abort: Bool, token: OperationToken) {
        // A pending recv or poll holds its own reference to the file: close alone would leave
        // it (and the socket) alive. Cancelled first, in the same submission.
        cancel(pending.read)
        cancel(pending.write)
        guard DirectDescriptor.isDirect(fd) else {
            if abort { Syscall.setLingerZero(fd) }
            let sqe = nextSQE()
            io_uring_prep_close(sqe, fd)
            io_uring_sqe_set_data64(sqe, token.raw)
            return
        }
        direct?.close(fd, abort: abort, token: token.raw) { nextSQE($0) }
    }

    public func peek(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int {
        Syscall.peek(fd, buffer, length)
    }

    public func receiveNow(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int {
        Syscall.recv(fd, buffer, length, flags: Int32(MSG_DONTWAIT))
    }

    public func sendNow(fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int {
        Syscall.send(fd, bytes.baseAddress!, bytes.count)
    }

    public func armDatagramReceive(fd: Int32, token: OperationToken) -> Bool {
        if datagramRing == nil { datagramRing = URingDatagramRing(ring: ring) }
        guard let datagramRing else { return false }  // no ring to be had: poll and recvmmsg
        let sqe = nextSQE()
        datagramRing.arm(sqe, fd: fd)
        io_uring_sqe_set_data64(sqe, token.raw)
        return true
    }

    public func datagram(_ buffer: UInt16, length: Int) -> ReceivedDatagram? { datagramRing?.datagram(buffer, length: length) }

    public func releaseDatagram(_ buffer: UInt16) { datagramRing?.release(buffer) }

    public func receiveDatagrams(fd: Int32, into batch: DatagramBatch) -> Int { batch.receive(fd) }

    public func sendDatagrams(fd: Int32, from batch: DatagramBatch, bytes: inout Int) -> Int { batch.send(fd, bytes: &bytes) }

    public func shutdown(fd: Int32, how: Int32) -> Int32 {
        Syscall.shutdown(fd, how)
    }

    public func pollReadable(fd: Int32, token: OperationToken) {
        let sqe = nextSQE()
        io_uring_prep_poll_add(sqe, fd, UInt32(POLLIN))
        target(sqe, fd)
        io_uring_sqe_set_data64(sqe, token.raw)
    }

    public func pollWritable(fd: Int32, token: OperationToken) {
        let sqe = nextSQE()
        io_uring_prep_poll_add(sqe, fd, UInt32(POLLOUT))
        target(sqe, fd)
        io_uring_sqe_set_data64(sqe, token.raw)
    }

    public func spliceIn(socket: Int32, pipe: Int32, length: Int, token: OperationToken) {
        immediate.append(Completion(token: token, result: Int32(Syscall.splice(from: socket, to: pipe, length: length))))
    }

    public func spliceOut(pipe: Int32, socket: Int32, length: Int, token: OperationToken) {
        immediate.append(Completion(token: token, result: Int32(Syscall.splice(from: pipe, to: socket, length: length))))
    }

    public func consumeWake(fd: Int32) {
        Syscall.drainEventFD(fd)
    }

    @inline(__always)
    public func releaseBuffer(_ id: UInt16) {
        buffers.markReturned(id)
        if buffers.isReserve(id) {
            igris_buf_ring_recycle(reserveRing, UInt32(buffers.reserveCount), buffers.pointer(id), UInt32(buffers.size), id)
        } else if !buffers.parkIfShrinking(id) {
            recycle(id)
        }
    }

    @inline(__always)
    private func recycle(_ id: UInt16) {
        igris_buf_ring_recycle(bufferRing, UInt32(buffers.count), buffers.pointer(id), UInt32(buffers.size), id)
    }

    public func waitForCompletions(timeoutNanoseconds: UInt64?) throws(SyscallError) {
        let rc: Int32
        switch immediate.isEmpty ? timeoutNanoseconds : 0 {
        case .some(0):
            rc = io_uring_submit_and_get_events(ring)
        case .none:
            rc = io_uring_submit_and_wait(ring, 1)
        case .some(let ns):
            var ts = __kernel_timespec(tv_sec: Int64(ns / 1_000_000_000), tv_nsec: Int64(ns % 1_000_000_000))
            var cqe: UnsafeMutablePointer<io_uring_cqe>?
            rc = io_uring_submit_and_wait_timeout(ring, &cqe, 1, &ts, nil)
        }
        if rc < 0 && rc != -ETIME && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY {
            throw SyscallError("io_uring_enter", errno: -rc)
        }
    }

    public var hasCompletions: Bool { !immediate.isEmpty || io_uring_cq_ready(ring) > 0 }

    private static var overflowFlushesPerTurn: Int { 64 }

    public func drainCompletions(_ body: (Completion) -> Void) {
        let bufferFlag = igris_cqe_flag_buffer()
        let moreFlag = igris_cqe_flag_more()
        let notifFlag = igris_cqe_flag_notif()
        let shift = igris_cqe_buffer_shift()
        if !immediate.isEmpty {
            swap(&immediate, &delivering)
            var k = 0
            while k < delivering.count {
                body(delivering[k])
                k += 1
            }
            delivering.removeAll(keepingCapacity: true)
        }
        // Batches until the CQ is empty; then, while the kernel holds completions back because
        // the CQ was full (IORING_FEAT_NODROP keeps them), count the event, have them flushed
        // into the CQ and take them too. A loop, not recursion: a tiny CQ under load overflows
        // again and again (ASan caught the recursion overflowing the stack). Bounded per turn;
        // what is left is flushed by the next io_uring_enter.
        var flushes = 0
        var exhausted = false
        while true {
            let n = igris_uring_take_completions(ring, batch, batchCapacity)
            for i in 0..<Int(n) {
                let c = batch[i]
                // 0: a cancellation; all ones: liburing's own timeout SQE.
                if c.user_data == 0 || c.user_data == UInt64.max { continue }
                if c.user_data == Self.cancelTag { continue }
                direct?.completed(c.user_data)
                var result = c.res
                if c.flags & notifFlag != 0 {
                    // SEND_ZC's second completion: the buffer is free, the send is done.
                    result = zeroCopyResults.removeValue(forKey: c.user_data) ?? 0
                } else if c.flags & moreFlag != 0 && OperationToken(raw: c.user_data).kind == .send {
                    // SEND_ZC's first: bytes sent, the kernel still reads the buffer.
                    zeroCopyResults[c.user_data] = c.res
                    continue
                }
                if result == -ENOBUFS && OperationToken(raw: c.user_data).kind != .datagramReadable { exhausted = true }
                var bufferID: UInt16? = nil
                if c.flags & bufferFlag != 0 {
                    let id = UInt16(truncatingIfNeeded: c.flags >> shift)
                    bufferID = id
                    // A datagram's buffer is the datagram ring's, not the pool's.
                    if OperationToken(raw: c.user_data).kind != .datagramReadable { buffers.markLent(id) }
                }
                body(Completion(token: OperationToken(raw: c.user_data), result: result, bufferID: bufferID,
                                more: c.flags & moreFlag != 0))
            }
            if n == batchCapacity { continue }
            guard igris_uring_sq_cq_overflow_flag(ring) != 0, flushes < Self.overflowFlushesPerTurn else { break }
            flushes += 1
            completionOverflows &+= 1
            _ = io_uring_get_events(ring)
        }
        let dropped = igris_uring_cq_overflow(ring)
        if dropped != droppedSeen {
            completionOverflows &+= UInt64(dropped &- droppedSeen)
            droppedSeen = dropped
        }
        // Few free buffers left in the ring: add parked ones before recvs find it empty.
        var more = buffers.shortfall(exhausted: exhausted)
        while more > 0, let id = buffers.unpark() {
            recycle(id)
            more -= 1
        }
    }

    public func adjustBuffers() {
        buffers.adjustTarget()
    }
}
