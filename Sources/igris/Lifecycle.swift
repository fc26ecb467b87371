import CLinux
import Dispatch
import Glibc
import IgrisEngine
import IgrisOperations
import IgrisPolicy
import Logging
import Synchronization

/// How a running `igris serve` hands over to a successor and how it stops: the hand-off
/// socket (`handoff_socket`), SIGUSR2 (start the successor: this binary's path as it is now,
/// the same arguments, plus `--takeover`), SIGTERM with a grace period, and systemd's
/// readiness notifications.
final class Lifecycle: Sendable {
    let server: Server
    let admins: [AdminServer]
    let logger: Logger
    let handoffPath: String?
    let drainGraceNanoseconds: UInt64
    /// Reloads and hand-offs change or hand out the listeners: one at a time.
    private let changing = DispatchSemaphore(value: 1)
    private let handedOver = Atomic<Bool>(false)
    private let stopSignals = Atomic<Int>(0)

    /// The executable as started (resolved before any upgrade replaces the file).
    static let executable: String = {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    }()

    init(server: Server, admins: [AdminServer], logger: Logger, handoffPath: String?, drainGraceNanoseconds: UInt64) {
        self.server = server
        self.admins = admins
        self.logger = logger
        self.handoffPath = handoffPath
        self.drainGraceNanoseconds = drainGraceNanoseconds
        _ = Self.executable
    }

    /// Serves successors on `listener` until one takes over.
    func serveHandoffs(_ listener: HandoffListener) {
        listener.start(HandoffListener.Callbacks(
            offer: { [self] in
                changing.wait()
                if server.isDraining { return [] }
                var sockets: [HandedSocket] = []
                for (address, fds) in server.listeningSockets {
                    for fd in fds { sockets.append(HandedSocket(role: .listener, address: address.description, fd: fd)) }
                }
                for a in admins { sockets.append(HandedSocket(role: .admin, address: a.address.description, fd: a.socket)) }
                return sockets
            },
            handedOver: { [self] successor in
                handedOver.store(true, ordering: .relaxed)
                server.beginDrain()
                for a in admins { a.stop() }
                changing.signal()
                logger.notice("listeners handed over: the successor accepts now; open connections drain", metadata: [
                    "successor": "\(successor)", "active": "\(server.total(.activeConnections))",
                    "deadline": "\(DurationArgument(nanoseconds: server.configuration.drainTimeoutNanoseconds))",
                ])
            },
            abandoned: { [self] successor, why in
                changing.signal()
                logger.warning("hand-off abandoned: still accepting here", metadata: ["successor": "\(successor)", "why": "\(why)"])
            }))
    }

    /// Runs `body` (a reload) unless a hand-off is under way or done.
    func whileListenersStay(_ body: () -> Void) {
        changing.wait()
        defer { changing.signal() }
        // After a hand-off the server drains too.
        if server.isDraining {
            logger.warning("SIGHUP ignored: this process is draining")
            return
        }
        body()
    }

    /// SIGUSR2: starts the successor, which takes the listeners over through the hand-off
    /// socket. A successor that fails to start leaves this process as it was.
    func upgrade() {
        guard handoffPath != nil else {
            logger.error("SIGUSR2 (upgrade) ignored: it needs a hand-off socket (handoff_socket in the file, or --handoff-socket)")
            return
        }
        if server.isDraining {
            logger.warning("SIGUSR2 (upgrade) ignored: this process is draining")
            return
        }
        var arguments = [Self.executable] + CommandLine.arguments.dropFirst()
        if !arguments.contains("--takeover") { arguments.append("--takeover") }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // The successor starts with no signal blocked (ours are, for the signal thread).
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK))
        var pid: pid_t = 0
        let argv = arguments.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        let rc = posix_spawn(&pid, Self.executable, nil, &attributes, argv, environ)
        guard rc == 0 else {
            logger.error("upgrade failed: cannot start the successor", metadata: ["executable": "\(Self.executable)", "error": "\(Errno.describe(rc))"])
            return
        }
        logger.notice("upgrade: successor started", metadata: ["pid": "\(pid)", "executable": "\(Self.executable)"])
        let child = pid
        WorkerThread.detach(name: "igris-upgrade") { [self] in
            var status: Int32 = 0
            while waitpid(child, &status, 0) < 0 && errno == EINTR {}
            if !handedOver.load(ordering: .relaxed) {
                let code = (status & 0x7f) == 0 ? "exit status \((status >> 8) & 0xff)" : "signal \(status & 0x7f)"
                logger.error("upgrade failed: the successor stopped before taking over; still accepting here",
                             metadata: ["pid": "\(child)", "status": "\(code)"])
            }
        }
    }

    /// SIGTERM/SIGINT: the first starts the drain (after the grace period), the second aborts.
    func stop(signal: Int32) {
        let count = stopSignals.wrappingAdd(1, ordering: .relaxed).newValue
        if count > 1 {
            logger.warning("second signal: aborting open connections", metadata: ["signal": "\(signal)"])
            server.abort()
            return
        }
        server.announceDrain()
        let grace = drainGraceNanoseconds
        logger.info("draining: /readyz fails now; accepting stops after the grace period, then open connections may finish", metadata: [
            "signal": "\(signal)", "grace": "\(DurationArgument(nanoseconds: grace))",
            "deadline": "\(DurationArgument(nanoseconds: server.configuration.drainTimeoutNanoseconds))",
            "active": "\(server.total(.activeConnections))",
        ])
        guard grace > 0 else {
            server.beginDrain()
            return
        }
        WorkerThread.detach(name: "igris-grace") { [server] in
            var left = timespec(tv_sec: Int(grace / 1_000_000_000), tv_nsec: Int(grace % 1_000_000_000))
            var rest = timespec()
            while nanosleep(&left, &rest) != 0 && errno == EINTR { left = rest }
            server.beginDrain()
        }
    }

    /// Tells systemd (Type=notify) that this process serves; a successor also names itself
    /// the service's main process.
    static func notifyReady(successor: Bool) {
        guard let socket = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), !socket.isEmpty else { return }
        let text = successor ? "MAINPID=\(getpid())\nREADY=1" : "READY=1"
        _ = igris_notify(socket, text)
    }
}
