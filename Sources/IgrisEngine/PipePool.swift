import CLinux
import Glibc

/// A worker's pipes for the splice path: socket → pipe → socket.
///
/// A direction borrows a pipe only while bytes are in flight and returns it once drained, so
/// an idle bridge holds none. Up to `idleLimit` drained pipes are kept for reuse; `limit`
/// caps how many exist at once (the pipe budget). A pipe that can't be had — budget spent,
/// `pipe2` failing, or `F_SETPIPE_SZ` refused once `pipe-user-pages-soft` is exceeded —
/// returns nil and the caller stays on the copy path.
final class PipePool {
    struct Pipe {
        var read: Int32
        var write: Int32
    }

    /// Bytes each pipe holds (what F_SETPIPE_SZ granted).
    private(set) var capacity: Int
    let limit: Int
    let idleLimit: Int
    private var idle: [Pipe] = []
    private(set) var inUse = 0
    private(set) var peakInUse = 0

    /// `requestedSize` is capped by /proc/sys/fs/pipe-max-size.
    init(requestedSize: Int, limit: Int, idleLimit: Int = 16) {
        self.capacity = min(requestedSize, Self.pipeMaxSize() ?? requestedSize)
        self.limit = limit
        self.idleLimit = idleLimit
        idle.reserveCapacity(idleLimit)
    }

    deinit {
        for p in idle { Syscall.close(p.read); Syscall.close(p.write) }
    }

    static func pipeMaxSize() -> Int? {
        let fd = igris_open_read("/proc/sys/fs/pipe-max-size")
        guard fd >= 0 else { return nil }
        defer { Syscall.close(fd) }
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, 31) }
        guard n > 0 else { return nil }
        return Int(String(decoding: buffer[0..<n], as: UTF8.self).filter(\.isNumber))
    }

    func borrow() -> Pipe? {
        if let p = idle.popLast() {
            inUse += 1
            peakInUse = max(peakInUse, inUse)
            return p
        }
        guard inUse + idle.count < limit else { return nil }
        var fds: [Int32] = [-1, -1]
        var size = Int32(capacity)
        let rc = fds.withUnsafeMutableBufferPointer { igris_make_pipe($0.baseAddress, &size) }
        guard rc == 0 else { return nil }
        // Every pipe in the pool has the same size, so one `capacity` describes them all.
        if Int(size) < capacity {
            Syscall.close(fds[0]); Syscall.close(fds[1])
            return nil
        }
        inUse += 1
        peakInUse = max(peakInUse, inUse)
        return Pipe(read: fds[0], write: fds[1])
    }

    /// A drained pipe goes back for reuse; one that still holds bytes (an aborted bridge) is closed.
    func giveBack(_ p: Pipe, empty: Bool) {
        inUse -= 1
        if empty && idle.count < idleLimit {
            idle.append(p)
        } else {
            Syscall.close(p.read)
            Syscall.close(p.write)
        }
    }
}
