import Glibc
import CLinux
import Dispatch
import Logging
import Synchronization
import IgrisPolicy

/// `--backend`: which backend to run, or `auto` to probe.
public enum BackendChoice: String, Sendable, CaseIterable {
    case auto
    case ioUring = "io_uring"
    case epoll
}

/// One `--listen` / `--upstream` pair.
public struct ForwardRule: Sendable {
    public var listen: SocketAddress
    public var upstream: SocketAddress

    public init(listen: SocketAddress, upstream: SocketAddress) {
        self.listen = listen
        self.upstream = upstream
    }
}

public struct ServerConfiguration: Sendable {
    public var listeners: [ListenerRule]
    /// The users file's accounts: negotiations name them, bridges count and pace their bytes.
    public var accounts: [UserAccount] = []
    public var workers: Int
    public var backend: BackendChoice
    public var connectTimeoutNanoseconds: UInt64 = 5_000_000_000
    public var idleTimeoutNanoseconds: UInt64? = nil
    /// Dead peers (a phone out of coverage, a NAT that dropped its mapping: no FIN, no RST):
    /// TCP keepalive and TCP_USER_TIMEOUT close their bridges within about this long. nil: off.
    public var deadPeerTimeoutNanoseconds: UInt64? = 120_000_000_000
    public var drainTimeoutNanoseconds: UInt64 = 30_000_000_000
    public var maxConnections: Int = 65536
    /// Whether max_connections was set by the operator (else it is the descriptor-derived default).
    public var maxConnectionsGiven = true
    /// Per-source and handshake-phase bounds (all off unless set; `igris serve` sets
    /// `SourceLimits.Settings.defaults`).
    public var sourceLimits = SourceLimits.Settings()
    /// The ports UDP ASSOCIATE relays bind (nil: any ephemeral port), so a firewall can open
    /// exactly them.
    public var udpRelayPorts: ClosedRange<UInt16>?
    public var buffers = BackendConfiguration()
    /// Each listening socket's backlog (one per worker): connections accepted by the kernel
    /// and not yet by igris. Under sustained overload a deep queue only ages its connections
    /// past their clients' patience, and serving those is work lost; 1,024 per worker bounded
    /// the wait where 4,096 let goodput collapse to 0.41× capacity in some runs (see Benchmarks/README.md).
    public var listenBacklog: Int32 = 1024
    /// io_uring: bridged connections' sockets move into each worker ring's fixed-file table
    /// (`IOBackend.makeDirect`), so bridges are bounded by the tables (RLIMIT_NOFILE entries
    /// each), not by the process's descriptors; such bridges take the copy path.
    public var directDescriptors = false
    /// After a turn that handled completions, each worker polls for the next one for up to
    /// this long before it sleeps (0: never). A round trip's reply usually comes within tens of
    /// microseconds, and catching it awake saves the wake-up: lower latency for a bounded
    /// cost, at most this much CPU per wake-up (HAProxy's `busy-polling`, bounded).
    public var busyPollNanoseconds: UInt64 = 0
    public static let busyPollLimitNanoseconds: UInt64 = 1_000_000_000
    public var splice: SpliceMode = .auto
    /// auto: consecutive full-buffer reads that move a direction to splice.
    public var spliceThreshold: Int = 4
    /// Bytes per pipe (F_SETPIPE_SZ), capped by /proc/sys/fs/pipe-max-size.
    public var pipeSize: Int = 1 << 20
    /// Pipes per worker at most (each is two descriptors while it exists).
    public var maxPipes: Int = 4096
    /// One logfmt line per closed connection on the `igris.access` logger (info level). Off
    /// for embedders unless asked for; `igris serve` turns it on (`--no-access-log`,
    /// `log.access_log: false`).
    public var accessLog = false
    /// Makes a worker's access-log sink, on that worker's thread (nil: lines go to the
    /// `igris.access` Logger one at a time).
    public var accessLogSink: (@Sendable () -> any AccessLogSink)?

    public init(listeners: [ListenerRule], workers: Int = Syscall.onlineCPUs(), backend: BackendChoice = .auto) {
        self.listeners = listeners
        self.workers = workers
        self.backend = backend
    }

    public init(forwards: [ForwardRule], workers: Int = Syscall.onlineCPUs(), backend: BackendChoice = .auto) {
        self.init(listeners: forwards.map { ListenerRule(listen: $0.listen, upstream: $0.upstream) },
                  workers: workers, backend: backend)
    }

    /// `rule` with this configuration's defaults wherever it has no setting of its own.
    func resolved(_ rule: ListenerRule) -> ListenerRule {
        var r = rule
        r.splice = rule.splice ?? splice
        r.connectTimeoutNanoseconds = rule.connectTimeoutNanoseconds ?? connectTimeoutNanoseconds
        r.idleTimeoutNanoseconds = .some(rule.idleTimeoutNanoseconds ?? idleTimeoutNanoseconds)
        r.deadPeerTimeoutNanoseconds = .some(rule.deadPeerTimeoutNanoseconds ?? deadPeerTimeoutNanoseconds)
        return r
    }
}

/// A start-up failure, with the one line an operator sees.
public enum ServerError: Error, CustomStringConvertible, Sendable {
    case listen(String, SyscallError)
    case backendUnavailable(BackendKind, String)
    case worker(Int, SyscallError)
    case configuration(String)

    public var description: String {
        switch self {
        case .listen(let address, let error):
            return "cannot listen on \(address): \(Errno.describe(error.errno)) (\(error.operation))"
        case .backendUnavailable(let kind, let reason):
            return "backend \(kind) unavailable: \(reason)"
        case .worker(let index, let error):
            return "worker \(index) failed: \(error)"
        case .configuration(let message):
            return message
        }
    }
}

/// The running gateway: listening sockets bound up front (so errors surface before any
/// thread starts), one worker thread per `workers`, and the drain/stop protocol.
public final class Server: Sendable {
    public let configuration: ServerConfiguration
    public let backend: BackendKind
    public let backendReason: String
    /// Where each forward actually listens (port 0 resolved).
    public let listenAddresses: [SocketAddress]
    public let statistics: [WorkerStatistics]
    public let budget: ConnectionBudget
    public let sourceLimits: SourceLimits
    private let controls: [WorkerControl]
    /// Every listener the server has had, by index (reloads append; removed ones stay, closed,
    /// so the connections they accepted keep their per-listener counters).
    private let listenerTable: Locked<[ActiveListener]>
    /// Each starting listener's own max_connections budget (nil: only the global one).
    private let listenerBudgets: [ConnectionBudget?]
    /// Per-listener counters are preallocated for this many listeners over the process's life.
    public static let maxListeners = 256
    private let threads = Locked<[pthread_t]>([])
    private let drainAnnounced = Atomic<Bool>(false)
    private let logger: Logger
    private let currentAccounts: Locked<[UserAccount]>

    /// `inherited`: listening sockets handed over by a running igris (`ListenerHandoff`); a
    /// listener whose address is among them accepts on those very sockets, so connections
    /// queued there are served, not reset.
    public init(configuration: ServerConfiguration, inherited: InheritedSockets? = nil,
                logger: Logger = Logger(label: "igris")) throws(ServerError) {
        self.configuration = configuration
        self.logger = logger
        currentAccounts = Locked(configuration.accounts)
        try Self.check(configuration.listeners)
        let (kind, reason) = try Self.selectBackend(configuration.backend)
        backend = kind
        backendReason = reason
        if configuration.directDescriptors && kind != .ioUring && configuration.backend == .epoll {
            throw .configuration("direct descriptors need the io_uring backend, and --backend epoll was asked for")
        }

        let (fds, addresses) = try Self.bindListeners(configuration.listeners.map(configuration.resolved), workers: configuration.workers,
                                                      backlog: configuration.listenBacklog, inherited: inherited)
        listenAddresses = addresses
        listenerTable = Locked(configuration.listeners.indices.map { k in
            ActiveListener(rule: configuration.listeners[k], address: addresses[k], sockets: fds.map { $0[k] }, open: true)
        })
        listenerBudgets = configuration.listeners.map { rule in rule.maxConnections.map { ConnectionBudget(limit: $0) } }
        statistics = (0..<configuration.workers).map { _ in WorkerStatistics(listeners: Self.maxListeners) }
        budget = ConnectionBudget(limit: configuration.maxConnections)
        sourceLimits = SourceLimits(configuration.sourceLimits)
        var controls: [WorkerControl] = []
        do {
            for _ in 0..<configuration.workers { controls.append(try WorkerControl()) }
        } catch {
            for list in fds { for sockets in list { for fd in sockets { Syscall.close(fd) } } }
            throw .worker(controls.count, error)
        }
        self.controls = controls
    }

    static func selectBackend(_ choice: BackendChoice) throws(ServerError) -> (BackendKind, String) {
        switch choice {
        case .epoll:
            return (.epoll, "requested with --backend epoll")
        case .ioUring:
            let probe = IOUringProbe.result
            guard probe.usable else { throw .backendUnavailable(.ioUring, probe.reason) }
            return (.ioUring, probe.reason)
        case .auto:
            let probe = IOUringProbe.result
            return probe.usable ? (.ioUring, probe.reason) : (.epoll, "io_uring unusable: \(probe.reason)")
        }
    }

    /// Every listener needs somewhere to send its connections.
    private static func check(_ rules: [ListenerRule]) throws(ServerError) {
        for rule in rules where rule.pool == nil && rule.negotiator == nil {
            throw .configuration("listener \(rule.name) has neither an upstream nor a negotiation")
        }
    }

    /// One SO_REUSEPORT socket per worker for each (resolved) rule: fds[worker][rule], and the
    /// address each rule got. A rule whose address `inherited` holds (or `reuse` gives)
    /// takes those sockets, spread over the workers; workers beyond them bind new ones into
    /// the same SO_REUSEPORT group. All or nothing: on a failure the sockets so far are closed.
    private static func bindListeners(_ rules: [ListenerRule], workers: Int, backlog: Int32, inherited: InheritedSockets? = nil,
                                      reuse: [Int: [Int32]] = [:]) throws(ServerError) -> ([[[Int32]]], [SocketAddress]) {
        var fds = Array(repeating: [[Int32]](), count: workers)
        var addresses: [SocketAddress] = []
        do {
            for (k, rule) in rules.enumerated() {
                for w in 0..<workers { fds[w].append([]) }
                let deadPeerTimeout = rule.deadPeerTimeoutNanoseconds ?? nil
                let taken = reuse[k] ?? inherited?.take(.listener, address: rule.listen.description) ?? []
                var address = rule.listen
                if let first = taken.first {
                    address = (try? Syscall.localAddress(first)) ?? address
                    for (j, fd) in taken.enumerated() {
                        fds[j % workers][k].append(fd)
                        // Accepted sockets inherit these: the new rule's, not the old
                        // process's; best effort (the socket already serves).
                        try? setInheritedOptions(fd, deadPeerTimeout: deadPeerTimeout)
                    }
                }
                if taken.isEmpty && address.port != 0 { try probeUnused(address, text: rule.listen.description) }
                for w in taken.count..<max(workers, taken.count) {
                    let fd = try makeListener(address, backlog: backlog, text: rule.listen.description, deadPeerTimeout: deadPeerTimeout)
                    if w == 0 {
                        // Port 0: the other workers join whatever port the kernel picked.
                        address = (try? Syscall.localAddress(fd)) ?? address
                    }
                    fds[w][k].append(fd)
                }
                addresses.append(address)
            }
        } catch {
            for list in fds { for sockets in list { for fd in sockets { Syscall.close(fd) } } }
            throw error
        }
        return (fds, addresses)
    }

    /// SO_REUSEPORT would let a second igris (or anything else with the option) join the
    /// running one's listener group silently and take half its connections. A bind without
    /// it fails while any process listens there: then only a hand-off (--takeover) may.
    private static func probeUnused(_ address: SocketAddress, text: String) throws(ServerError) {
        let fd: Int32
        do { fd = try Syscall.streamSocket(family: address.family) } catch { throw .listen(text, error) }
        defer { Syscall.close(fd) }
        do {
            try Syscall.setIntOption(fd, level: SOL_SOCKET, name: SO_REUSEADDR, value: 1, "SO_REUSEADDR")
            if address.family == AF_INET6 {
                try Syscall.setIntOption(fd, level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY, value: 1, "IPV6_V6ONLY")
            }
            try Syscall.bind(fd, address)
        } catch {
            if error.errno == EADDRINUSE {
                throw .configuration("cannot listen on \(text): Address already in use by another process (to replace a running igris, start the new one with --takeover)")
            }
            throw .listen(text, error)
        }
    }

    /// What accepted sockets inherit from their listener, so that no connection pays a
    /// syscall for it: the keepalive settings and TCP_NODELAY (forwarded bytes go out as they
    /// arrive; Nagle would only add latency).
    private static func setInheritedOptions(_ fd: Int32, deadPeerTimeout: UInt64?) throws(SyscallError) {
        try Syscall.setDeadPeerTimeout(fd, nanoseconds: deadPeerTimeout)
        try Syscall.setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
    }

    private static func makeListener(_ address: SocketAddress, backlog: Int32, text: String,
                                     deadPeerTimeout: UInt64?) throws(ServerError) -> Int32 {
        let fd: Int32
        do { fd = try Syscall.streamSocket(family: address.family) } catch { throw .listen(text, error) }
        do {
            try Syscall.setIntOption(fd, level: SOL_SOCKET, name: SO_REUSEADDR, value: 1, "SO_REUSEADDR")
            try Syscall.setIntOption(fd, level: SOL_SOCKET, name: SO_REUSEPORT, value: 1, "SO_REUSEPORT")
            if address.family == AF_INET6 {
                // [::]:P and 0.0.0.0:P are separate listeners, as in nginx and HAProxy.
                try Syscall.setIntOption(fd, level: Int32(IPPROTO_IPV6), name: IPV6_V6ONLY, value: 1, "IPV6_V6ONLY")
            }
            try setInheritedOptions(fd, deadPeerTimeout: deadPeerTimeout)
            try Syscall.bind(fd, address)
            try Syscall.listen(fd, backlog: backlog)
        } catch {
            Syscall.close(fd)
            throw .listen(text, error)
        }
        return fd
    }

    /// Descriptors the process needs at most: two per bridge, each worker's listeners, ring or
    /// epoll and eventfds, and 64 for what comes
    /// and goes beside the bridges (a client held for room, admin scrapes, health checks):
    /// with less, a full table of bridges ran out of descriptors (EMFILE) before
    /// max_connections stopped accepting, and what accept had taken was closed.
    static func descriptorsNeeded(maxConnections: Int, workers: Int, listeners: Int) -> Int {
        maxConnections * 2 + workers * (listeners + 4) + 64
    }

    /// The default `max_connections`: what RLIMIT_NOFILE allows (`descriptorsNeeded`), at
    /// most 65,536, as HAProxy derives its maxconn. With direct descriptors (on io_uring)
    /// bridges hold table entries instead, RLIMIT_NOFILE of them per worker.
    public static func defaultMaxConnections(workers: Int, listeners: Int, direct: Bool = false) -> Int {
        let overhead = descriptorsNeeded(maxConnections: 0, workers: workers, listeners: listeners)
        let perProcess = (Syscall.descriptorLimit - overhead) / 2
        return max(1, min(65536, direct ? workers * perProcess : perProcess))
    }

    /// Whether `directDescriptors` takes effect: asked for, and io_uring chosen.
    public static func usesDirectDescriptors(_ asked: Bool, backend: BackendChoice) -> Bool {
        guard asked, let (kind, _) = try? selectBackend(backend) else { return false }
        return kind == .ioUring
    }

    /// A warning for the operator when `--max-connections` can't be reached within
    /// RLIMIT_NOFILE.
    public var descriptorWarning: String? {
        let needed = Self.descriptorsNeeded(maxConnections: configuration.maxConnections, workers: configuration.workers,
                                            listeners: configuration.listeners.count)
        guard Syscall.descriptorLimit < needed, !usesDirectDescriptors else { return nil }
        return "max-connections \(configuration.maxConnections) needs about \(needed) descriptors but RLIMIT_NOFILE is \(Syscall.descriptorLimit): "
            + "past that, accepting pauses; raise LimitNOFILE / ulimit -n or lower --max-connections"
    }

    /// Bridges move to the rings' fixed-file tables (asked for, on io_uring).
    public var usesDirectDescriptors: Bool { configuration.directDescriptors && backend == .ioUring }

    /// Starts the workers; returns once each has built its backend (or throws the first
    /// worker's failure after stopping the others).
    public func start() throws(ServerError) {
        // send() uses MSG_NOSIGNAL, but splice() into a reset socket has no such flag and
        // would raise SIGPIPE: the gateway must see EPIPE instead (as swift-nio does).
        signal(SIGPIPE, SIG_IGN)
        let failures = Locked<[ServerError]>([])
        let ready = DispatchSemaphore(value: 0)
        let slotsPerWorker = configuration.maxConnections
        var backendConfiguration = configuration.buffers
        if usesDirectDescriptors { backendConfiguration.directDescriptors = Syscall.descriptorLimit }
        let rules = configuration.listeners.map(configuration.resolved)
        // The listeners bound at start: each one's sockets, per worker.
        let sockets = listenerTable.withLock { $0.prefix(rules.count).map(\.sockets) }
        for w in 0..<configuration.workers {
            let workerConfiguration = WorkerConfiguration(
                index: w,
                listeners: Self.bound(sockets.map { $0[w] }, rules: rules, budgets: listenerBudgets, firstIndex: 0),
                backend: backendConfiguration,
                drainTimeoutNanoseconds: configuration.drainTimeoutNanoseconds,
                slotCapacity: slotsPerWorker,
                spliceThreshold: configuration.spliceThreshold,
                pipeSize: configuration.pipeSize,
                maxPipes: configuration.maxPipes,
                workerCount: configuration.workers,
                listenBacklog: Int(configuration.listenBacklog),
                busyPollNanoseconds: configuration.busyPollNanoseconds,
                accounts: configuration.accounts,
                sourceLimits: sourceLimits,
                udpRelayPorts: configuration.udpRelayPorts)
            let kind = backend
            let control = controls[w]
            let stats = statistics[w]
            let budget = budget
            let accessLog = configuration.accessLog
            let accessLogSink = configuration.accessLogSink
            var log = logger
            log[metadataKey: "worker"] = "\(w)"
            let workerLogger = log
            let thread = WorkerThread.spawn(name: "igris-w\(w)") {
                do throws(SyscallError) {
                    switch kind {
                    case .ioUring:
                        let backend = try URingBackend(configuration: workerConfiguration.backend)
                        if w == 0 {
                            workerLogger.debug("io_uring ring set up", metadata: [
                                "flags": "\(backend.setupDescription)", "zero_copy_send": "\(backend.zeroCopyDescription)",
                                "direct_descriptors": "\(backend.directDescription)",
                            ])
                        }
                        if workerConfiguration.backend.directDescriptors > 0 && backend.directCapacity == 0 {
                            workerLogger.warning("direct descriptors unavailable: bridges keep regular descriptors",
                                                 metadata: ["why": "\(backend.directDescription)"])
                        }
                        let worker = Worker(backend: backend, configuration: workerConfiguration, control: control,
                                            statistics: stats, budget: budget, logger: workerLogger,
                                            accessLogger: accessLog ? (accessLogSink?() ?? LoggerAccessLog(Logger(label: "igris.access"))) : nil)
                        ready.signal()
                        try worker.run()
                    case .epoll:
                        let backend = try EpollBackend(configuration: workerConfiguration.backend)
                        let worker = Worker(backend: backend, configuration: workerConfiguration, control: control,
                                            statistics: stats, budget: budget, logger: workerLogger,
                                            accessLogger: accessLog ? (accessLogSink?() ?? LoggerAccessLog(Logger(label: "igris.access"))) : nil)
                        ready.signal()
                        try worker.run()
                    }
                } catch {
                    failures.withLock { $0.append(.worker(w, error)) }
                    workerLogger.error("worker stopped", metadata: ["error": "\(error)"])
                    ready.signal()
                }
            }
            threads.withLock { $0.append(thread) }
        }
        for _ in 0..<configuration.workers { ready.wait() }
        if let first = failures.withLock({ $0.first }) {
            abort()
            wait()
            throw first
        }
    }

    /// A worker's listeners in server order, then the extra sockets some of them have (after
    /// a hand-off from more workers), so that position k is listener k when there are none.
    private static func bound(_ sockets: [[Int32]], rules: [ListenerRule], budgets: [ConnectionBudget?], firstIndex: Int) -> [BoundListener] {
        var list: [BoundListener] = []
        for (k, fds) in sockets.enumerated() where !fds.isEmpty {
            list.append(BoundListener(fd: fds[0], rule: rules[k], budget: budgets[k], index: firstIndex + k))
        }
        for (k, fds) in sockets.enumerated() {
            for fd in fds.dropFirst() { list.append(BoundListener(fd: fd, rule: rules[k], budget: budgets[k], index: firstIndex + k)) }
        }
        return list
    }

    /// SIGTERM: stop accepting, close listeners, let bridges drain to the deadline.
    public func beginDrain() {
        drainAnnounced.store(true, ordering: .relaxed)
        for c in controls { c.requestDrain() }
    }

    /// The drain is coming (a grace period runs first): /readyz fails from now on, while the
    /// listeners still accept, so a balancer stops sending before they close.
    /// CPU seconds (user + system) each worker thread has used, from /proc (0 for a worker
    /// not running yet).
    public func workerCPUSeconds() -> [Double] {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        return statistics.map { s in
            let tid = s.load(.threadID)
            guard tid > 0, let f = fopen("/proc/self/task/\(tid)/stat", "r") else { return 0 }
            defer { fclose(f) }
            var line = [CChar](repeating: 0, count: 1024)
            guard fgets(&line, Int32(line.count), f) != nil else { return 0 }
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            // After the name's closing parenthesis: state is field 3, utime 14, stime 15.
            guard let close = text.lastIndex(of: ")") else { return 0 }
            let fields = text[text.index(after: close)...].split(separator: " ")
            guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
            return (user + system) / ticks
        }
    }

    /// The users file's accounts now (a reload appends; removed ones stay, marked).
    public var accounts: [UserAccount] { currentAccounts.withLock { $0 } }

    /// A users-file reload (`Authenticator.reload`): every worker takes the accounts, ends
    /// the tunnels of removed and expired users and applies changed rate limits.
    public func updateAccounts(_ accounts: [UserAccount]) {
        currentAccounts.withLock { $0 = accounts }
        for c in controls { c.requestAccounts(accounts) }
    }

    public func announceDrain() { drainAnnounced.store(true, ordering: .relaxed) }

    /// Second signal: abort every bridge now.
    public func abort() { for c in controls { c.requestAbort() } }

    /// Joins the worker threads (they exit once drained).
    public func wait() {
        let list = threads.withLock { t -> [pthread_t] in
            let copy = t
            t.removeAll()
            return copy
        }
        for t in list { pthread_join(t, nil) }
    }

    public func total(_ counter: WorkerStatistics.Counter) -> Int64 {
        statistics.reduce(0) { $0 + $1.load(counter) }
    }

    /// A per-listener counter summed over the workers.
    public func total(listener: Int, _ counter: WorkerStatistics.ListenerCounter) -> Int64 {
        statistics.reduce(0) { $0 + $1.load(listener: listener, counter) }
    }

    /// The connect latency histogram summed over the workers: per-bucket counts and sum (ns).
    public func connectLatency() -> (buckets: [Int64], sumNanoseconds: Int64) { histogram { $0.connectLatency() } }

    /// TLS handshake durations, all workers (same buckets as `connectLatency`).
    public func tlsHandshakeDuration() -> (buckets: [Int64], sumNanoseconds: Int64) { histogram { $0.tlsHandshakeDuration() } }

    private func histogram(_ read: (WorkerStatistics) -> (buckets: [Int64], sumNanoseconds: Int64)) -> (buckets: [Int64], sumNanoseconds: Int64) {
        var buckets = [Int64](repeating: 0, count: WorkerStatistics.connectLatencyBounds.count + 1)
        var sum: Int64 = 0
        for s in statistics {
            let (b, total) = read(s)
            for i in buckets.indices { buckets[i] += b[i] }
            sum += total
        }
        return (buckets, sum)
    }

    /// Names of every listener so far, by index (the `listener` label of the metrics).
    public var listenerNames: [String] { listenerTable.withLock { $0.map(\.rule.name) } }

    /// The listeners accepting now, with the addresses they are bound to.
    public var openListeners: [(rule: ListenerRule, address: SocketAddress)] {
        listenerTable.withLock { $0.filter(\.open).map { ($0.rule, $0.address) } }
    }

    /// SIGHUP: makes `listeners` the set of open listeners. Unchanged ones (same name and the
    /// same settings) keep their sockets; new or changed ones are bound first — any failure
    /// leaves everything as it was and throws — then the workers switch at their next turn.
    /// Connections already open are not touched, whatever happens to their listener.
    public func reload(listeners: [ListenerRule]) throws(ServerError) -> ReloadSummary {
        try Self.check(listeners)
        let current = listenerTable.withLock { $0 }
        var keep: Set<Int> = []
        var added: [ListenerRule] = []
        for rule in listeners {
            if let i = current.indices.first(where: { current[$0].open && current[$0].rule.name == rule.name && current[$0].rule.signature == rule.signature }) {
                keep.insert(i)
            } else {
                added.append(rule)
            }
        }
        let removed = current.indices.filter { current[$0].open && !keep.contains($0) }
        guard current.count + added.count <= Self.maxListeners else {
            throw .configuration("reload would make \(current.count + added.count) listeners over this process's life (at most \(Self.maxListeners)): restart instead")
        }
        // A changed listener at the same address takes over the old one's sockets (duplicated:
        // the worker closes the old descriptor), so connections queued there are not reset.
        var reuse: [Int: [Int32]] = [:]
        for (k, rule) in added.enumerated() {
            if let old = removed.first(where: { current[$0].address == rule.listen || current[$0].rule.listen == rule.listen }) {
                reuse[k] = current[old].sockets.flatMap { $0 }.compactMap { Syscall.duplicate($0) }
            }
        }
        // Bind everything new before changing anything.
        let resolvedAdded = added.map(configuration.resolved)
        let (fds, addresses) = try Self.bindListeners(resolvedAdded, workers: configuration.workers,
                                                      backlog: configuration.listenBacklog, reuse: reuse)
        let addedBudgets = added.map { rule in rule.maxConnections.map { ConnectionBudget(limit: $0) } }
        listenerTable.withLock { table in
            for i in removed { table[i].open = false }
            for k in added.indices {
                table.append(ActiveListener(rule: added[k], address: addresses[k], sockets: fds.map { $0[k] }, open: true))
            }
        }
        for (w, control) in controls.enumerated() {
            let add = Self.bound(fds[w], rules: resolvedAdded, budgets: addedBudgets, firstIndex: current.count)
            control.requestReload(ReloadCommand(add: add, remove: removed))
        }
        return ReloadSummary(added: added.map(\.name), removed: removed.map { current[$0].rule.name }, kept: keep.sorted().map { current[$0].rule.name })
    }

    /// The open listeners' sockets, for a successor (`ListenerHandoff`). The descriptors stay
    /// this server's: they are valid until `beginDrain` closes them, and a reload must not
    /// run meanwhile (the caller serialises the two).
    public var listeningSockets: [(address: SocketAddress, fds: [Int32])] {
        listenerTable.withLock { $0.filter(\.open).map { ($0.address, $0.sockets.flatMap { $0 }) } }
    }

    /// Whether a worker paused accepting for lack of descriptors (or memory) in the last
    /// second: /readyz answers 503 and /healthz says so while it lasts.
    public var isAcceptingPaused: Bool { statistics.contains { $0.load(.acceptPaused) != 0 } }

    /// Whether the workers are draining (SIGTERM): /readyz answers 503 from then on.
    public var isDraining: Bool { drainAnnounced.load(ordering: .relaxed) || controls.contains { $0.isDrainRequested } }
}

/// A listener the server has had; `open` until a reload removes it.
struct ActiveListener: Sendable {
    var rule: ListenerRule
    var address: SocketAddress
    /// sockets[worker]: the descriptors that worker accepts on (valid while `open`).
    var sockets: [[Int32]]
    var open: Bool
}

/// What a reload did, by listener name.
public struct ReloadSummary: Sendable, Equatable {
    public var added: [String]
    public var removed: [String]
    public var kept: [String]
}
