import CLinux
import Glibc
import IgrisPolicy

/// Handing the listening sockets of a running igris to its successor (a new binary or a new
/// configuration), over a unix socket with SCM_RIGHTS, so that no queued connection is reset
/// and no client is refused while the binary changes:
///
///  1. the successor connects to the predecessor's hand-off socket and says HELLO;
///  2. the predecessor sends each listening socket (listeners, admin, the hand-off socket
///     itself), one per message, then END;
///  3. the successor accepts on those very sockets (same accept queues), binds what is new,
///     and says READY; anything short of READY (an exit, a timeout) abandons the hand-off and
///     the predecessor goes on accepting as before;
///  4. the predecessor stops accepting, closes its descriptors (the sockets live on in the
///     successor) and says DONE; its open connections drain to its drain deadline.
///
/// SOCK_SEQPACKET keeps one message per socket; only the same user (or root) is served.
public enum ListenerHandoff {
    static let hello = "HELLO igris-handoff/1"

    /// How long the predecessor waits for READY once it has sent the sockets.
    public static let readyTimeoutSeconds = 60

    /// Whether `path` can be a hand-off socket: absolute, and short enough for sockaddr_un.
    public static func isValidPath(_ path: String) -> Bool { path.hasPrefix("/") && path.utf8.count < 108 }
}

/// One socket passed from predecessor to successor.
public struct HandedSocket: Sendable {
    public enum Role: String, Sendable {
        case listener, admin, handoff
    }

    public var role: Role
    /// Where it is bound: a SocketAddress's text, or the hand-off socket's path.
    public var address: String
    public var fd: Int32

    public init(role: Role, address: String, fd: Int32) {
        self.role = role
        self.address = address
        self.fd = fd
    }
}

/// A hand-off failure, as the one line an operator reads.
public struct HandoffError: Error, CustomStringConvertible, Sendable {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// The sockets a successor received, taken by role and address as it sets up its listeners;
/// `closeUnclaimed` closes the rest (listeners the new configuration dropped).
public final class InheritedSockets: Sendable {
    private let sockets: Locked<[HandedSocket]>

    public init(_ sockets: [HandedSocket]) { self.sockets = Locked(sockets) }

    /// Every socket of `role` bound to `address`, removed from the set.
    public func take(_ role: HandedSocket.Role, address: String) -> [Int32] {
        sockets.withLock { list in
            let taken = list.filter { $0.role == role && $0.address == address }.map(\.fd)
            list.removeAll { $0.role == role && $0.address == address }
            return taken
        }
    }

    public var remaining: [HandedSocket] { sockets.withLock { $0 } }

    public func closeUnclaimed() {
        let rest = sockets.withLock { list -> [HandedSocket] in
            defer { list.removeAll() }
            return list
        }
        for s in rest { Syscall.close(s.fd) }
    }
}

/// The successor's side: connect, take the sockets, then confirm once serving.
public final class HandoffSession: Sendable {
    private let fd: Int32
    public let sockets: InheritedSockets
    public let predecessor: Int32

    /// Connects to a running igris at `path` and receives its listening sockets.
    public init(path: String) throws(HandoffError) {
        let fd = path.withCString { igris_unix_seqpacket($0, 0) }
        guard fd >= 0 else {
            throw HandoffError("no running igris to take over from at \(path): \(Errno.describe(-fd))")
        }
        Self.setTimeout(fd, seconds: 10)
        var handed: [HandedSocket] = []
        func fail(_ why: String) -> HandoffError {
            for s in handed { Syscall.close(s.fd) }
            Syscall.close(fd)
            return HandoffError("hand-off from \(path) failed: \(why)")
        }
        guard Self.send(fd, "\(ListenerHandoff.hello) \(getpid())") else { throw fail(Errno.describe(errno)) }
        var pid: Int32 = 0
        while true {
            guard let (text, passed) = Self.receive(fd) else { throw fail("the running igris closed the connection (\(Errno.describe(errno)))") }
            let parts = text.split(separator: " ", maxSplits: 2).map(String.init)
            if parts.first == "END", parts.count == 2, let p = Int32(parts[1]) {
                pid = p
                break
            }
            guard parts.count == 3, parts[0] == "S", let role = HandedSocket.Role(rawValue: parts[1]), passed >= 0 else {
                if passed >= 0 { Syscall.close(passed) }
                throw fail("unexpected message '\(text.prefix(80))'")
            }
            handed.append(HandedSocket(role: role, address: parts[2], fd: passed))
        }
        self.fd = fd
        sockets = InheritedSockets(handed)
        predecessor = pid
    }

    /// Tells the predecessor to stop accepting; waits (bounded) until it has.
    public func ready() throws(HandoffError) {
        defer { Syscall.close(fd) }
        Self.setTimeout(fd, seconds: 30)
        guard Self.send(fd, "READY") else { throw HandoffError("the running igris went away before READY: \(Errno.describe(errno))") }
        guard let (text, passed) = Self.receive(fd), text == "DONE" else {
            throw HandoffError("the running igris did not confirm the hand-off")
        }
        if passed >= 0 { Syscall.close(passed) }
    }

    /// Gives up: the predecessor sees the connection close and keeps accepting.
    public func abandon() {
        sockets.closeUnclaimed()
        Syscall.close(fd)
    }

    static func setTimeout(_ fd: Int32, seconds: Int) {
        var t = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &t, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &t, socklen_t(MemoryLayout<timeval>.size))
    }

    static func send(_ fd: Int32, _ text: String, passing socket: Int32 = -1) -> Bool {
        var bytes = Array(text.utf8)
        return igris_send_with_fd(fd, &bytes, bytes.count, socket) == bytes.count
    }

    /// One message and the descriptor it carried (-1: none); nil at the end or on an error.
    static func receive(_ fd: Int32) -> (String, Int32)? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        var passed: Int32 = -1
        let n = buffer.withUnsafeMutableBytes { igris_recv_with_fd(fd, $0.baseAddress, $0.count, &passed) }
        guard n > 0 else {
            if passed >= 0 { Syscall.close(passed) }
            return nil
        }
        return (String(decoding: buffer[0..<n], as: UTF8.self), passed)
    }
}

/// The predecessor's side: the hand-off socket, served on a thread of its own.
public final class HandoffListener: Sendable {
    public let path: String
    let fd: Int32

    /// Binds `path` (a stale socket file left by a process that died is replaced; one a
    /// running igris still serves is an error), or adopts the one a predecessor handed over.
    public init(path: String, inherited: InheritedSockets? = nil) throws(HandoffError) {
        self.path = path
        if let fd = inherited?.take(.handoff, address: path).first {
            self.fd = fd
            return
        }
        var fd = path.withCString { igris_unix_seqpacket($0, 1) }
        if fd == -EADDRINUSE {
            let probe = path.withCString { igris_unix_seqpacket($0, 0) }
            if probe >= 0 {
                Syscall.close(probe)
                throw HandoffError("hand-off socket \(path) is in use by a running igris: start with --takeover to take over from it")
            }
            unlink(path)
            fd = path.withCString { igris_unix_seqpacket($0, 1) }
        }
        guard fd >= 0 else { throw HandoffError("cannot listen on hand-off socket \(path): \(Errno.describe(-fd))") }
        chmod(path, 0o600)
        self.fd = fd
    }

    /// What a hand-off session needs from the running process.
    public struct Callbacks: Sendable {
        /// The sockets to hand over (listeners, admin), in a consistent state: no reload may
        /// change them until `handedOver` or `abandoned` is called.
        public var offer: @Sendable () -> [HandedSocket]
        /// READY came: stop accepting, close our descriptors, drain.
        public var handedOver: @Sendable (_ successor: Int32) -> Void
        /// The successor went away or timed out before READY: carry on.
        public var abandoned: @Sendable (_ successor: Int32, _ why: String) -> Void

        public init(offer: @escaping @Sendable () -> [HandedSocket], handedOver: @escaping @Sendable (Int32) -> Void,
                    abandoned: @escaping @Sendable (Int32, String) -> Void) {
            self.offer = offer
            self.handedOver = handedOver
            self.abandoned = abandoned
        }
    }

    /// Serves successors one at a time until one takes over.
    public func start(_ callbacks: Callbacks) {
        let fd = self.fd
        let path = self.path
        WorkerThread.detach(name: "igris-handoff") {
            while true {
                let c = Syscall.accept(fd, nonBlocking: false)
                if c == -EINTR || c == -ECONNABORTED { continue }
                if c < 0 { return }
                let done = Self.serve(c, listener: fd, path: path, callbacks)
                Syscall.close(c)
                if done {
                    Syscall.close(fd)  // the successor holds it now
                    return
                }
            }
        }
    }

    /// One successor: true once it took over.
    private static func serve(_ c: Int32, listener: Int32, path: String, _ callbacks: Callbacks) -> Bool {
        var successor: Int32 = 0
        var uid: UInt32 = 0
        guard igris_peer_credentials(c, &successor, &uid) == 0, uid == geteuid() || uid == 0 else { return false }
        HandoffSession.setTimeout(c, seconds: 10)
        guard let (hello, passed) = HandoffSession.receive(c), hello.hasPrefix(ListenerHandoff.hello) else { return false }
        if passed >= 0 { Syscall.close(passed) }
        let sockets = callbacks.offer() + [HandedSocket(role: .handoff, address: path, fd: listener)]
        for s in sockets {
            guard HandoffSession.send(c, "S \(s.role.rawValue) \(s.address)", passing: s.fd) else {
                callbacks.abandoned(successor, "sending the sockets failed: \(Errno.describe(errno))")
                return false
            }
        }
        guard HandoffSession.send(c, "END \(getpid())") else {
            callbacks.abandoned(successor, "sending the sockets failed: \(Errno.describe(errno))")
            return false
        }
        HandoffSession.setTimeout(c, seconds: ListenerHandoff.readyTimeoutSeconds)
        guard let (ready, extra) = HandoffSession.receive(c), ready == "READY" else {
            callbacks.abandoned(successor, "it exited or timed out before it was ready")
            return false
        }
        if extra >= 0 { Syscall.close(extra) }
        callbacks.handedOver(successor)
        _ = HandoffSession.send(c, "DONE")
        return true
    }
}
