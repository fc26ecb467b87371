import Glibc
import CURing

/// The syscalls IGRIS issues directly, each wrapped once: `EINTR` is retried here, errno is
/// read immediately after the call (the wrappers are `@inline(never)` as in swift-nio, so no
/// retain/release can run in between) and becomes a `SyscallError` naming the operation.
public enum Syscall {
    @inline(never)
    public static func socket(family: Int32, type: Int32) throws(SyscallError) -> Int32 {
        let fd = Glibc.socket(family, type, 0)
        if fd < 0 { throw SyscallError("socket", errno: igris_errno()) }
        return fd
    }

    @inline(never)
    public static func close(_ fd: Int32) {
        // Linux closes the descriptor even when close() reports EINTR; never retry.
        _ = Glibc.close(fd)
    }

    @inline(never)
    public static func setIntOption(_ fd: Int32, level: Int32, name: Int32, value: Int32, _ what: String) throws(SyscallError) {
        var v = value
        if setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) != 0 {
            throw SyscallError("setsockopt(\(what))", errno: igris_errno())
        }
    }

    /// SO_LINGER {on, 0}: the next close() sends RST instead of FIN (used to abort).
    @inline(never)
    public static func setLingerZero(_ fd: Int32) {
        var l = linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size))
    }

    @inline(never)
    public static func bind(_ fd: Int32, _ address: SocketAddress) throws(SyscallError) {
        let rc = address.withSockAddr { Glibc.bind(fd, $0, $1) }
        if rc != 0 { throw SyscallError("bind", errno: igris_errno()) }
    }

    @inline(never)
    public static func listen(_ fd: Int32, backlog: Int32) throws(SyscallError) {
        if Glibc.listen(fd, backlog) != 0 { throw SyscallError("listen", errno: igris_errno()) }
    }

    @inline(never)
    public static func localAddress(_ fd: Int32) throws(SyscallError) -> SocketAddress {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
        }
        if rc != 0 { throw SyscallError("getsockname", errno: igris_errno()) }
        return SocketAddress(storage: storage, length: len)
    }

    /// accept4; returns nil on EAGAIN.
    @inline(never)
    public static func accept(_ fd: Int32, flags: Int32) throws(SyscallError) -> Int32? {
        while true {
            let c = igris_accept4(fd, flags)
            if c >= 0 { return c }
            let e = igris_errno()
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return nil }
            throw SyscallError("accept", errno: e)
        }
    }

    /// Non-blocking connect: returns true when connected at once, false when in progress.
    @inline(never)
    public static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t) throws(SyscallError) -> Bool {
        while true {
            if Glibc.connect(fd, address, length) == 0 { return true }
            let e = igris_errno()
            if e == EINTR { continue }
            if e == EINPROGRESS || e == EALREADY { return false }
            throw SyscallError("connect", errno: e)
        }
    }

    /// The pending error of a socket (SO_ERROR), 0 when none.
    @inline(never)
    public static func socketError(_ fd: Int32) -> Int32 {
        var err: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 { return igris_errno() }
        return err
    }

    /// recv: bytes read (0 = EOF), or -errno. EINTR retried; EAGAIN returned as -EAGAIN.
    @inline(never)
    public static func recv(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ length: Int) -> Int {
        while true {
            let n = Glibc.recv(fd, buffer, length, 0)
            if n >= 0 { return n }
            let e = igris_errno()
            if e == EINTR { continue }
            return -Int(e)
        }
    }

    /// recv with MSG_PEEK | MSG_DONTWAIT: looks at what is queued without taking it.
    @inline(never)
    public static func peek(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ length: Int) -> Int {
        while true {
            let n = Glibc.recv(fd, buffer, length, Int32(MSG_PEEK | MSG_DONTWAIT))
            if n >= 0 { return n }
            let e = igris_errno()
            if e == EINTR { continue }
            return -Int(e)
        }
    }

    /// The peer of a connected socket.
    @inline(never)
    public static func peerAddress(_ fd: Int32) throws(SyscallError) -> SocketAddress {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) }
        }
        if rc != 0 { throw SyscallError("getpeername", errno: igris_errno()) }
        return SocketAddress(storage: storage, length: len)
    }

    /// send with MSG_NOSIGNAL: bytes written, or -errno.
    @inline(never)
    public static func send(_ fd: Int32, _ buffer: UnsafeRawPointer, _ length: Int) -> Int {
        while true {
            let n = Glibc.send(fd, buffer, length, Int32(MSG_NOSIGNAL))
            if n >= 0 { return n }
            let e = igris_errno()
            if e == EINTR { continue }
            return -Int(e)
        }
    }

    /// shutdown: 0 or -errno.
    @inline(never)
    public static func shutdown(_ fd: Int32, _ how: Int32) -> Int32 {
        if Glibc.shutdown(fd, how) == 0 { return 0 }
        return -igris_errno()
    }

    @inline(never)
    public static func eventfd() throws(SyscallError) -> Int32 {
        let fd = CURing.eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC))
        if fd < 0 { throw SyscallError("eventfd", errno: igris_errno()) }
        return fd
    }

    /// Adds one to an eventfd counter (wakes whoever polls it).
    @inline(never)
    public static func signalEventFD(_ fd: Int32) {
        var one: UInt64 = 1
        _ = Glibc.write(fd, &one, 8)
    }

    /// Resets an eventfd counter; EAGAIN (already zero) is fine.
    @inline(never)
    public static func drainEventFD(_ fd: Int32) {
        var value: UInt64 = 0
        _ = Glibc.read(fd, &value, 8)
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    @inline(__always)
    public static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    public static func onlineCPUs() -> Int {
        max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }
}
