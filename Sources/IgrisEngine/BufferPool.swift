import Glibc
import CLinux

/// A worker's fixed-size buffers: one anonymous mmap of `count * size` bytes.
///
/// Pages are only made resident when first written, so an idle worker costs little; under
/// load, memory is bounded by `count * size` whatever the traffic. The pool tracks which
/// buffers are lent out so the epoll backend can pick free ones and both backends can
/// report use; on io_uring the kernel picks from the provided buffer ring instead, and the
/// free list here is unused.
public final class BufferPool {
    public let size: Int
    public let count: Int
    public let base: UnsafeMutableRawPointer
    /// Free buffer ids (stack), for the epoll backend.
    private var freeStack: UnsafeMutablePointer<UInt16>
    private var freeTop: Int
    /// Buffers currently lent out (received into and not yet sent).
    public private(set) var inUse: Int = 0
    public private(set) var peakInUse: Int = 0

    public init(size: Int, count: Int) throws(SyscallError) {
        precondition(count > 0 && count <= 32768 && count & (count - 1) == 0, "buffer count must be a power of two ≤ 32768")
        precondition(size >= 1024 && size <= 1 << 20)
        self.size = size
        self.count = count
        let p = mmap(nil, size * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        guard let p, p != UnsafeMutableRawPointer(bitPattern: -1) else { throw SyscallError("mmap(buffer pool)", errno: igris_errno()) }
        base = p
        freeStack = .allocate(capacity: count)
        for i in 0..<count { freeStack[i] = UInt16(count - 1 - i) }
        freeTop = count
    }

    deinit {
        munmap(base, size * count)
        freeStack.deallocate()
    }

    @inline(__always)
    public func pointer(_ id: UInt16) -> UnsafeMutableRawPointer {
        base + Int(id) * size
    }

    /// Epoll path: take a free buffer, or nil when all are lent out.
    @inline(__always)
    public func take() -> UInt16? {
        guard freeTop > 0 else { return nil }
        freeTop -= 1
        return freeStack[freeTop]
    }

    /// Epoll path: put back a buffer taken but not filled (EAGAIN, EOF).
    @inline(__always)
    public func putBack(_ id: UInt16) {
        freeStack[freeTop] = id
        freeTop += 1
    }

    /// A completion delivered bytes in buffer `id`: it is now lent to the worker.
    @inline(__always)
    public func markLent() {
        inUse += 1
        if inUse > peakInUse { peakInUse = inUse }
    }

    /// The worker returned a lent buffer.
    @inline(__always)
    public func markReturned() {
        inUse -= 1
    }

    public var available: Int { count - inUse }
}
