import Glibc
import CLinux

/// A worker's buffers: one anonymous mmap of `count * size` bytes (the worker's share of
/// `buffer_memory`), of which only `active` buffers circulate.
///
/// The pool is elastic. It starts with `initialActive` buffers in circulation and grows on
/// demand (`grow`), never past `count`. Once a second the worker sets a target from the
/// recent peak use (`adjustTarget`); while more buffers circulate than that, buffers coming
/// back are parked instead of reused, and a parked buffer's pages go back to the kernel
/// (MADV_DONTNEED), so memory follows load down as well as up.
///
/// Who holds which buffer: a free buffer is in the backend's hands (the io_uring buffer ring,
/// or `freeStack` for epoll), a lent one is the worker's (received into, not yet sent), a
/// parked one nobody's. Only lent and parked buffers pass through the worker, which is why a
/// buffer is parked when it comes back and not while it waits in the kernel's ring.
///
/// The last eighth of the ids (`reserveCount`, none in pools under 8) is the reserve: a set
/// of its own (its own io_uring buffer group, its own free stack), lent only to reads that ask
/// for it (`Worker.reserveRead`), so that recvs armed earlier cannot land in it. The rest is
/// the main set, the elastic one.
public final class BufferPool {
    public let size: Int
    /// The most buffers this worker may use (its memory budget / `size`), reserve included.
    public let count: Int
    /// Ids below this are the main set; the rest the reserve.
    public let mainCount: Int
    public var reserveCount: Int { count - mainCount }
    public let base: UnsafeMutableRawPointer
    /// Main buffers in circulation: free or lent.
    public private(set) var active: Int
    /// Buffers lent out (received into and not yet sent), reserve included.
    public private(set) var inUse: Int = 0
    /// Reserve buffers lent out.
    public private(set) var reserveInUse: Int = 0
    /// Main buffers lent out.
    @inline(__always)
    public var mainInUse: Int { inUse - reserveInUse }
    public private(set) var peakInUse: Int = 0
    /// Buffers parked since the pool was made, for the metrics and tests.
    public private(set) var parkedTotal: Int = 0
    /// `active` wanted; above it, returned buffers are parked.
    public private(set) var target: Int
    /// Circulation the pool starts with and never shrinks below.
    public let initialActive: Int
    /// Free buffer ids (stack), for the epoll backend.
    private let freeStack: UnsafeMutablePointer<UInt16>
    private var freeTop = 0
    /// Free reserve ids, for the epoll backend.
    private let reserveStack: UnsafeMutablePointer<UInt16>
    private var reserveTop = 0
    /// Parked ids: not in circulation, no resident memory.
    private let parked: UnsafeMutablePointer<UInt16>
    private var parkedTop = 0
    /// Peak use in each of the last `peakWindow` seconds (a ring), for `adjustTarget`.
    private var recentPeaks: [Int]
    private var recentPeakIndex = 0
    private var peakThisSecond = 0
    static let peakWindow = 5

    public init(size: Int, count: Int, initialActive: Int = 64) throws(SyscallError) {
        precondition(count > 0 && count <= 32768 && count & (count - 1) == 0, "buffer count must be a power of two ≤ 32768")
        precondition(size >= 1024 && size <= 1 << 20)
        self.size = size
        self.count = count
        mainCount = count >= 8 ? count - count / 8 : count
        let p = mmap(nil, size * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != UnsafeMutableRawPointer(bitPattern: -1) else { throw SyscallError("mmap(buffer pool)", errno: igris_errno()) }
        base = p
        self.initialActive = min(mainCount, max(2, initialActive))
        active = self.initialActive
        target = self.initialActive
        freeStack = .allocate(capacity: count)
        reserveStack = .allocate(capacity: max(1, count - mainCount))
        parked = .allocate(capacity: count)
        // Ids below `initialActive` circulate; the rest of the main set starts parked.
        for i in 0..<self.initialActive { freeStack[i] = UInt16(self.initialActive - 1 - i) }
        freeTop = self.initialActive
        for i in self.initialActive..<mainCount { parked[parkedTop] = UInt16(mainCount - 1 - (i - self.initialActive)); parkedTop += 1 }
        for id in mainCount..<count { reserveStack[reserveTop] = UInt16(id); reserveTop += 1 }
        recentPeaks = Array(repeating: 0, count: Self.peakWindow)
    }

    deinit {
        munmap(base, size * count)
        freeStack.deallocate()
        reserveStack.deallocate()
        parked.deallocate()
    }

    @inline(__always)
    public func pointer(_ id: UInt16) -> UnsafeMutableRawPointer {
        base + Int(id) * size
    }

    /// The main ids in circulation at start, and the reserve's, for the io_uring backend to
    /// fill its two rings with.
    public func takeInitialFree() -> (main: [UInt16], reserve: [UInt16]) {
        let ids = (0..<freeTop).map { freeStack[$0] }
        let reserve = (0..<reserveTop).map { reserveStack[$0] }
        freeTop = 0
        reserveTop = 0
        return (ids, reserve)
    }

    @inline(__always)
    public func isReserve(_ id: UInt16) -> Bool { Int(id) >= mainCount }

    // MARK: - Epoll: the free stack

    /// Epoll path: take a free buffer (growing the circulation when none is free), or nil when
    /// the budget is spent.
    @inline(__always)
    public func take() -> UInt16? {
        if freeTop == 0, let id = unpark() { return id }
        guard freeTop > 0 else { return nil }
        freeTop -= 1
        return freeStack[freeTop]
    }

    /// Epoll path: a free reserve buffer, or nil.
    @inline(__always)
    public func takeReserve() -> UInt16? {
        guard reserveTop > 0 else { return nil }
        reserveTop -= 1
        return reserveStack[reserveTop]
    }

    /// Epoll path: put back a buffer taken but not filled (EAGAIN, EOF).
    @inline(__always)
    public func putBack(_ id: UInt16) {
        if isReserve(id) {
            reserveStack[reserveTop] = id
            reserveTop += 1
        } else {
            freeStack[freeTop] = id
            freeTop += 1
        }
    }

    /// Epoll path: a returned buffer, free again unless the pool is shrinking.
    @inline(__always)
    public func returnToStack(_ id: UInt16) {
        markReturned(id)
        if isReserve(id) || !parkIfShrinking(id) { putBack(id) }
    }

    // MARK: - Lending

    /// A completion delivered bytes in buffer `id`: it is now lent to the worker.
    @inline(__always)
    public func markLent(_ id: UInt16) {
        inUse += 1
        if isReserve(id) { reserveInUse += 1 }
        if inUse > peakInUse { peakInUse = inUse }
        if mainInUse > peakThisSecond { peakThisSecond = mainInUse }
    }

    /// The worker returned lent buffer `id`.
    @inline(__always)
    public func markReturned(_ id: UInt16) {
        inUse -= 1
        if isReserve(id) { reserveInUse -= 1 }
    }

    /// Free main buffers in circulation.
    public var available: Int { active - mainInUse }

    /// Buffers a waiting read could get now: main ones, or the reserve's once only it is left.
    public var obtainable: Int { inReserve ? reserveCount - reserveInUse : available }

    /// Under pressure: half the main set is lent out. Directions then read no further ahead.
    @inline(__always)
    public var underPressure: Bool { mainInUse * 2 >= mainCount }

    /// The main set is all lent out: a direction now reads only into an empty destination,
    /// from the reserve (`Worker.reserveRead`), which the kernel takes whatever its memory
    /// pressure, so the reserve never ends up pinned behind a send that cannot complete and a
    /// connection holding nothing can always make progress.
    @inline(__always)
    public var inReserve: Bool { reserveCount > 0 && mainInUse >= mainCount }

    // MARK: - Growing and shrinking

    /// Takes a parked buffer into circulation; nil when all are circulating.
    @inline(__always)
    public func unpark() -> UInt16? {
        guard parkedTop > 0 else { return nil }
        parkedTop -= 1
        active += 1
        if target < active { target = active }
        return parked[parkedTop]
    }

    /// io_uring: few free buffers left in the ring (under a quarter of the circulation, or
    /// under 2), or none at some point: how many parked ones to add now, doubling the
    /// circulation at most.
    /// `exhausted`: a recv found the ring empty since the last look, whatever is free now.
    @inline(__always)
    public func shortfall(exhausted: Bool) -> Int {
        let free = active - mainInUse
        guard exhausted || free < max(2, active / 4), parkedTop > 0 else { return 0 }
        return min(parkedTop, max(8, active))
    }

    /// A buffer coming back while more circulate than wanted is parked: out of circulation,
    /// its pages returned to the kernel. True when it was.
    @inline(__always)
    public func parkIfShrinking(_ id: UInt16) -> Bool {
        guard active > target else { return false }
        _ = madvise(pointer(id), size, MADV_DONTNEED)
        parked[parkedTop] = id
        parkedTop += 1
        active -= 1
        parkedTotal += 1
        return true
    }

    /// Once a second: the target becomes twice the peak use of the last few seconds (never
    /// below `initialActive`). Epoll parks surplus free buffers at once; io_uring's wait in the
    /// kernel's ring and are parked as they come back from use.
    public func adjustTarget() {
        recentPeaks[recentPeakIndex] = peakThisSecond
        recentPeakIndex = (recentPeakIndex + 1) % recentPeaks.count
        peakThisSecond = mainInUse
        let recent = recentPeaks.max() ?? 0
        target = max(initialActive, min(mainCount, 2 * recent))
    }

    /// Epoll: parks free buffers beyond the target.
    public func shrinkFreeStack() {
        while active > target && freeTop > 0 {
            freeTop -= 1
            _ = parkIfShrinking(freeStack[freeTop])
        }
    }
}
