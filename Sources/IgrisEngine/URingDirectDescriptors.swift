import Glibc
import CURing
import CLinux

/// A worker ring's fixed-file table, holding bridged sockets as direct descriptors
/// (`IOBackend.makeDirect`): the table's references keep them open without a descriptor, so
/// they don't count against RLIMIT_NOFILE.
///
/// Entries go in pairs (a bridge's client at 2k, its upstream at 2k+1), so one update moves
/// both. A pair is free again only once both of its entries' closes have completed: an entry
/// is never reused while an operation might still reach what it held.
final class URingDirectDescriptors {
    /// Entries in the table.
    let capacity: Int
    /// setsockopt through the ring works here (6.7+): an aborted direct socket gets its RST.
    let abortsWithReset: Bool
    private let ring: UnsafeMutablePointer<io_uring>
    private var freePairs: [Int32]
    /// Sockets still open per pair.
    private var open: [UInt8]
    /// The entry each direct close frees when it completes, by its user_data.
    private var closing: [UInt64: Int32] = [:]
    /// The descriptors each entry is filled from (IORING_OP_FILES_UPDATE reads them when it
    /// runs, at the next submission): one place per entry, so it stays put until then.
    private let sources: UnsafeMutablePointer<Int32>
    private let lingerZero: UnsafeMutablePointer<linger>
    /// user_data of the operations whose completions nobody waits for.
    private let ignoredTag: UInt64

    /// A sparse table of `entries` (at most RLIMIT_NOFILE, the kernel's cap per ring), or
    /// the reason there is none. Asks the kernel once whether setsockopt runs through the ring.
    static func make(ring: UnsafeMutablePointer<io_uring>, entries: Int, ignoredTag: UInt64) -> Result<URingDirectDescriptors, SyscallError> {
        let n = min(entries, Syscall.descriptorLimit) & ~1
        let rc = io_uring_register_files_sparse(ring, UInt32(n))
        guard rc == 0 else { return .failure(SyscallError("io_uring_register_files_sparse(\(n))", errno: -rc)) }
        return .success(URingDirectDescriptors(ring: ring, capacity: n, ignoredTag: ignoredTag))
    }

    private init(ring: UnsafeMutablePointer<io_uring>, capacity: Int, ignoredTag: UInt64) {
        self.ring = ring
        self.capacity = capacity
        self.ignoredTag = ignoredTag
        sources = .allocate(capacity: capacity)
        open = [UInt8](repeating: 0, count: capacity / 2)
        freePairs = (0..<Int32(capacity / 2)).reversed()
        closing.reserveCapacity(1024)
        lingerZero = .allocate(capacity: 1)
        lingerZero.initialize(to: linger(l_onoff: 1, l_linger: 0))
        abortsWithReset = Self.setsockoptThroughRing(ring, ignoredTag: ignoredTag)
    }

    deinit {
        sources.deallocate()
        lingerZero.deallocate()
    }

    private static func setsockoptThroughRing(_ ring: UnsafeMutablePointer<io_uring>, ignoredTag: UInt64) -> Bool {
        let probe = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard probe >= 0, let sqe = io_uring_get_sqe(ring) else { return false }
        defer { Syscall.close(probe) }
        var one: Int32 = 1
        igris_prep_setsockopt(sqe, probe, SOL_SOCKET, SO_KEEPALIVE, &one, Int32(MemoryLayout<Int32>.size))
        io_uring_sqe_set_data64(sqe, ignoredTag)
        var cqe: UnsafeMutablePointer<io_uring_cqe>?
        guard io_uring_submit_and_wait(ring, 1) >= 0, io_uring_peek_cqe(ring, &cqe) == 0, let cqe else { return false }
        defer { io_uring_cqe_seen(ring, cqe) }
        return cqe.pointee.res == 0
    }

    var description: String {
        "\(capacity) entries" + (abortsWithReset ? "" : " (no setsockopt through the ring: aborts close with FIN)")
    }

    /// Queues the move of a bridge's two sockets into a free pair: an IORING_OP_FILES_UPDATE
    /// with the two descriptors' closes hard-linked behind it (no syscall of its own). The
    /// update runs when it is submitted, before any operation queued after it names the
    /// entries; the closes run whatever it returns, so no descriptor is left behind (were it
    /// refused, the entries stay empty and the bridge's operations fail with EBADF).
    /// `sqe(n)`: the next free SQE, with room for `n` in one submission.
    func move(client: Int32, upstream: Int32, sqe: (UInt32) -> UnsafeMutablePointer<io_uring_sqe>) -> (client: Int32, upstream: Int32)? {
        guard let pair = freePairs.popLast() else { return nil }
        let entry = Int(pair) * 2
        sources[entry] = client
        sources[entry + 1] = upstream
        let update = sqe(3)
        io_uring_prep_files_update(update, sources + entry, 2, Int32(entry))
        igris_sqe_hardlink(update)
        io_uring_sqe_set_data64(update, ignoredTag)
        let closeClient = sqe(1)
        io_uring_prep_close(closeClient, client)
        igris_sqe_hardlink(closeClient)
        io_uring_sqe_set_data64(closeClient, ignoredTag)
        let closeUpstream = sqe(1)
        io_uring_prep_close(closeUpstream, upstream)
        io_uring_sqe_set_data64(closeUpstream, ignoredTag)
        open[Int(pair)] = 2
        return (Int32(entry) | DirectDescriptor.flag, Int32(entry + 1) | DirectDescriptor.flag)
    }

    /// Queues the close of a direct socket (its pending operations already cancelled), with
    /// SO_LINGER {on, 0} first for an abort where the ring takes setsockopt (hard-linked, so
    /// the close runs whatever it returns). `token` completes once the entry is closed.
    func close(_ fd: Int32, abort: Bool, token: UInt64, sqe: (UInt32) -> UnsafeMutablePointer<io_uring_sqe>) {
        let entry = DirectDescriptor.entry(fd)
        if abort && abortsWithReset {
            let linger = sqe(2)
            igris_prep_setsockopt(linger, 0, SOL_SOCKET, SO_LINGER, lingerZero, Int32(MemoryLayout<linger>.size))
            igris_sqe_fixed_file(linger, entry)
            igris_sqe_hardlink(linger)
            io_uring_sqe_set_data64(linger, ignoredTag)
        }
        let close = sqe(1)
        io_uring_prep_close_direct(close, UInt32(entry))
        io_uring_sqe_set_data64(close, token)
        closing[token] = entry
    }

    /// A completion: if it is a direct close's, its entry may be reused once its pair's other
    /// one is closed too.
    @inline(__always)
    func completed(_ userData: UInt64) {
        guard !closing.isEmpty, let entry = closing.removeValue(forKey: userData) else { return }
        let pair = Int(entry >> 1)
        open[pair] -= 1
        if open[pair] == 0 { freePairs.append(Int32(pair)) }
    }
}
