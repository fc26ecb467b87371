import Glibc
import CLinux

/// The syscalls IGRIS issues directly, each wrapped once, in the manner of swift-nio's
/// `NIOPosix/System.swift`:
/// - `retrying` is the one place EINTR is retried and errno is read (right after the call:
///   the wrappers are `@inline(never)`, so no retain/release can run in between);
/// - hot paths (data, handshake bytes) return io_uring-style `-errno`; cold paths (setup,
///   addresses, options) throw a typed `SyscallError` naming the operation;
/// - EBADF and EFAULT trap: they mean IGRIS passed a descriptor or pointer it does not own,
///   the class of bug that moves one connection's bytes into another's (Kernel-notes).
public enum Syscall {
    /// Runs `body` until it does not fail with EINTR: its result, or -errno.
    @inline(__always)
    static func retrying<T: SignedInteger>(_ name: StaticString, _ body: () -> T) -> T {
        while true {
            let rc = body()
            if rc >= 0 { return rc }
            let e = igris_errno()
            if e == EINTR { continue }
            if e == EBADF || e == EFAULT { descriptorBug(name, e) }
            return -T(e)
        }
    }

    /// `retrying`, throwing the failure (cold paths).
    @inline(__always)
    static func checked<T: SignedInteger>(_ name: StaticString, _ body: () -> T) throws(SyscallError) -> T {
        let rc = retrying(name, body)
        if rc < 0 { throw SyscallError("\(name)", errno: Int32(-rc)) }
        return rc
    }

    private static func descriptorBug(_ name: StaticString, _ e: Int32) -> Never {
        fatalError("\(name): \(Errno.describe(e)) — a descriptor or buffer IGRIS does not own")
    }

    /// The one stream-socket constructor: TCP, close-on-exec, non-blocking unless asked
    /// (every socket a backend owns must be; test clients and blocking tools may not be).
    /// `source`: the local address an outgoing socket connects from, its port left to
    /// connect(), which picks one unique for the whole 4-tuple (IP_BIND_ADDRESS_NO_PORT; a
    /// bind-time port would have to be unique for the address alone).
    @inline(never)
    public static func streamSocket(family: Int32, nonBlocking: Bool = true, source: SocketAddress? = nil) throws(SyscallError) -> Int32 {
        var type = SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue
        if nonBlocking { type |= SOCK_NONBLOCK.rawValue }
        let fd = try checked("socket") { Glibc.socket(family, Int32(type), 0) }
        guard let source else { return fd }
        do throws(SyscallError) {
            try setIntOption(fd, level: Int32(IPPROTO_IP), name: 24 /* IP_BIND_ADDRESS_NO_PORT */, value: 1, "IP_BIND_ADDRESS_NO_PORT")
            try bind(fd, source.withPort(0))
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    /// A non-blocking, close-on-exec UDP socket bound to `address` (port 0: any). An IPv6
    /// wildcard is dual-stack, so one socket reaches IPv4 destinations too (as mapped addresses).
    @inline(never)
    public static func datagramSocket(bound address: SocketAddress) throws(SyscallError) -> Int32 {
        let type = SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue
        let fd = try checked("socket") { Glibc.socket(address.family, Int32(type), 0) }
        do throws(SyscallError) {
            if address.family == AF_INET6 { try setIntOption(fd, level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY, value: 0, "IPV6_V6ONLY") }
            try bind(fd, address)
        } catch {
            close(fd)
            throw error
        }
        return fd
    }

    /// sendto, non-blocking: bytes, or -errno (-EAGAIN: the socket's buffer is full; UDP drops).
    @inline(never)
    public static func sendDatagram(_ fd: Int32, _ buffer: UnsafeRawPointer, _ length: Int, to address: SocketAddress) -> Int {
        address.withSockAddr { sa, size in
            retrying("sendto") { Glibc.sendto(fd, buffer, length, Int32(MSG_DONTWAIT | MSG_NOSIGNAL), sa, size) }
        }
    }

    @inline(never)
    public static func close(_ fd: Int32) {
        // Linux closes the descriptor even when close() reports EINTR: never retry.
        if Glibc.close(fd) != 0 && igris_errno() == EBADF { descriptorBug("close", EBADF) }
    }

    @inline(never)
    public static func setIntOption(_ fd: Int32, level: Int32, name: Int32, value: Int32, _ what: String) throws(SyscallError) {
        var v = value
        let rc = retrying("setsockopt") { setsockopt(fd, level, name, &v, socklen_t(MemoryLayout<Int32>.size)) }
        if rc < 0 { throw SyscallError("setsockopt(\(what))", errno: -rc) }
    }

    /// TCP keepalive and TCP_USER_TIMEOUT so that a peer gone without FIN or RST is noticed
    /// within about `nanoseconds`: probes start after half of it, four more follow an eighth
    /// apart (at least a second: the kernel counts keepalive in seconds), and bytes left
    /// unacknowledged that long abort the connection too. A peer that answers probes is never
    /// affected, however long it stays idle.
    @inline(never)
    public static func setDeadPeerTimeout(_ fd: Int32, nanoseconds: UInt64?) throws(SyscallError) {
        guard let nanoseconds else {
            // Off: a socket reused from another configuration may have had them on.
            try setIntOption(fd, level: SOL_SOCKET, name: SO_KEEPALIVE, value: 0, "SO_KEEPALIVE")
            try setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_USER_TIMEOUT, value: 0, "TCP_USER_TIMEOUT")
            return
        }
        let seconds = max(1, Int32(min(nanoseconds / 1_000_000_000, 1 << 20)))
        try setIntOption(fd, level: SOL_SOCKET, name: SO_KEEPALIVE, value: 1, "SO_KEEPALIVE")
        try setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_KEEPIDLE, value: max(1, seconds / 2), "TCP_KEEPIDLE")
        try setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_KEEPINTVL, value: max(1, seconds / 8), "TCP_KEEPINTVL")
        try setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_KEEPCNT, value: 4, "TCP_KEEPCNT")
        try setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_USER_TIMEOUT,
                         value: Int32(min(nanoseconds / 1_000_000, UInt64(Int32.max))), "TCP_USER_TIMEOUT")
    }

    /// A close-on-exec duplicate of `fd` (the same open socket), or nil.
    public static func duplicate(_ fd: Int32) -> Int32? {
        let d = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        return d >= 0 ? d : nil
    }

    /// SO_LINGER {on, 0}: the next close() sends RST instead of FIN (used to abort).
    @inline(never)
    public static func setLingerZero(_ fd: Int32) {
        var l = linger(l_onoff: 1, l_linger: 0)
        _ = retrying("setsockopt(SO_LINGER)") { setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, socklen_t(MemoryLayout<linger>.size)) }
    }

    @inline(never)
    public static func bind(_ fd: Int32, _ address: SocketAddress) throws(SyscallError) {
        _ = try checked("bind") { address.withSockAddr { Glibc.bind(fd, $0, $1) } }
    }

    @inline(never)
    public static func listen(_ fd: Int32, backlog: Int32) throws(SyscallError) {
        _ = try checked("listen") { Glibc.listen(fd, backlog) }
    }

    @inline(never)
    public static func localAddress(_ fd: Int32) throws(SyscallError) -> SocketAddress {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = try checked("getsockname") {
            withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        }
        return SocketAddress(storage: storage, length: len)
    }

    /// The peer of a connected socket.
    @inline(never)
    public static func peerAddress(_ fd: Int32) throws(SyscallError) -> SocketAddress {
        var storage = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = try checked("getpeername") {
            withUnsafeMutablePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } }
        }
        return SocketAddress(storage: storage, length: len)
    }

    /// accept4 (non-blocking, close-on-exec): the new fd, or -errno (-EAGAIN: backlog empty).
    @inline(never)
    public static func accept(_ fd: Int32, nonBlocking: Bool = true) -> Int32 {
        let flags = nonBlocking ? SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue : SOCK_CLOEXEC.rawValue
        return retrying("accept4") { igris_accept4(fd, Int32(flags)) }
    }

    /// Non-blocking connect: 0 when connected at once, -EINPROGRESS while it runs, -errno.
    @inline(never)
    public static func connect(_ fd: Int32, _ address: UnsafePointer<sockaddr>, _ length: socklen_t) -> Int32 {
        let rc = retrying("connect") { Glibc.connect(fd, address, length) }
        return rc == -EALREADY ? -EINPROGRESS : rc
    }

    /// The pending error of a socket (SO_ERROR), 0 when none.
    @inline(never)
    public static func socketError(_ fd: Int32) -> Int32 {
        var err: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        let rc = retrying("getsockopt(SO_ERROR)") { getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) }
        return rc < 0 ? -rc : err
    }

    /// recv: bytes read (0 = EOF), or -errno (-EAGAIN on a non-blocking socket with nothing).
    @inline(never)
    public static func recv(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ length: Int, flags: Int32 = 0) -> Int {
        retrying("recv") { Glibc.recv(fd, buffer, length, flags) }
    }

    /// recv with MSG_PEEK | MSG_DONTWAIT: looks at what is queued without taking it.
    @inline(__always)
    public static func peek(_ fd: Int32, _ buffer: UnsafeMutableRawPointer, _ length: Int) -> Int {
        recv(fd, buffer, length, flags: Int32(MSG_PEEK | MSG_DONTWAIT))
    }

    /// send with MSG_NOSIGNAL: bytes written, or -errno.
    @inline(never)
    public static func send(_ fd: Int32, _ buffer: UnsafeRawPointer, _ length: Int) -> Int {
        retrying("send") { Glibc.send(fd, buffer, length, Int32(MSG_NOSIGNAL)) }
    }

    /// shutdown: 0 or -errno.
    @inline(never)
    public static func shutdown(_ fd: Int32, _ how: Int32) -> Int32 {
        retrying("shutdown") { Glibc.shutdown(fd, how) }
    }

    /// splice(2) between a socket and a pipe, non-blocking: bytes moved, or -errno.
    @inline(never)
    public static func splice(from source: Int32, to destination: Int32, length: Int) -> Int {
        retrying("splice") { igris_splice(source, destination, length) }
    }

    /// Bytes `fd`'s send buffer takes now without blocking, at least (`igris_send_room`),
    /// the buffer's size and what is queued in it; nil when the socket cannot say.
    @inline(__always)
    public static func sendRoom(_ fd: Int32) -> (room: Int, size: Int, queued: Int)? {
        var size = 0
        var queued = 0
        let n = igris_send_room(fd, &size, &queued)
        return n >= 0 ? (n, size, queued) : nil
    }

    /// RLIMIT_NOFILE's soft limit as it was at start.
    public static let descriptorLimit: Int = {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return Int.max }
        return limit.rlim_cur >= UInt64(Int.max) ? Int.max : Int(limit.rlim_cur)
    }()

    /// Whether `count` more descriptors can be opened now (opened and closed at once).
    public static func descriptorsAvailable(_ count: Int) -> Bool {
        var opened: [Int32] = []
        defer { for fd in opened { close(fd) } }
        for _ in 0..<count {
            let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { return false }
            opened.append(fd)
        }
        return true
    }

    /// poll(POLLOUT) without waiting: true when `fd` has room to write (or an error to report).
    public static func isWritable(_ fd: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
        let n = retrying("poll") { Glibc.poll(&p, 1, 0) }
        return n > 0 && p.revents != 0
    }

    @inline(never)
    public static func eventfd() throws(SyscallError) -> Int32 {
        try checked("eventfd") { CLinux.eventfd(0, Int32(EFD_NONBLOCK | EFD_CLOEXEC)) }
    }

    /// Adds one to an eventfd counter (wakes whoever polls it).
    @inline(never)
    public static func signalEventFD(_ fd: Int32) {
        var one: UInt64 = 1
        _ = retrying("write(eventfd)") { Glibc.write(fd, &one, 8) }
    }

    /// Resets an eventfd counter; EAGAIN (already zero) is fine.
    @inline(never)
    public static func drainEventFD(_ fd: Int32) {
        var value: UInt64 = 0
        _ = retrying("read(eventfd)") { Glibc.read(fd, &value, 8) }
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
