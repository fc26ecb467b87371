import Glibc
import CURing
import Logging
import IgrisPolicy
import IgrisProtocols

/// What a worker needs to know about one listen address: its own SO_REUSEPORT socket and
/// where connections accepted on it go.
public struct WorkerListener: Sendable {
    public var fd: Int32
    public var name: String
    public var mode: ListenerMode
    public var acceptProxyProtocol = false
    public var sendProxyProtocol: ProxyProtocol.Version?
    public var proxyHeaderTimeoutNanoseconds: UInt64 = 10_000_000_000
    /// The listener's settings, the server's filled in where it has none of its own.
    public var splice: SpliceMode = .auto
    public var connectTimeoutNanoseconds: UInt64 = 5_000_000_000
    public var idleTimeoutNanoseconds: UInt64?
    /// Shared by the workers: this listener's max_connections.
    public var budget: ConnectionBudget?
}

/// Per-worker settings.
public struct WorkerConfiguration: Sendable {
    public var index: Int
    public var listeners: [WorkerListener]
    public var backend: BackendConfiguration
    public var drainTimeoutNanoseconds: UInt64
    /// Slots in this worker's connection table.
    public var slotCapacity: Int
    /// auto: consecutive full-buffer reads that move a direction to splice.
    public var spliceThreshold: Int = 4
    public var pipeSize: Int = 1 << 20
    /// Pipes this worker may have at once (the pipe budget).
    public var maxPipes: Int = 4096
    /// Workers in the server (health checks of pool k run on worker k % workerCount).
    public var workerCount: Int = 1
}

/// One worker thread's event loop: its backend, connection table, timers and listeners.
///
/// Generic over the backend so every I/O call is statically dispatched; confined to the
/// thread that created it (the io_uring ring is `SINGLE_ISSUER`), so nothing here is locked.
final class Worker<Backend: IOBackend> {
    struct Listener {
        var fd: Int32
        var name: String
        /// forward: where connections go (nil for the gateway modes).
        var pool: UpstreamPool?
        /// nil for forward; the handshake's protocol and options otherwise.
        var gateway: GatewayProtocol?
        var gatewayOptions: GatewayOptions?
        var acceptProxyProtocol = false
        var sendProxyProtocol: ProxyProtocol.Version?
        var proxyHeaderTimeoutNanoseconds: UInt64 = 10_000_000_000
        var splice: SpliceMode = .auto
        var connectTimeoutNanoseconds: UInt64 = 5_000_000_000
        var idleTimeoutNanoseconds: UInt64?
        var budget: ConnectionBudget?
        var open = true
        var acceptArmed = false
        var pausedUntil: UInt64 = 0
    }

    static var acceptPauseNanoseconds: UInt64 { 100_000_000 }

    let backend: Backend
    let statistics: WorkerStatistics
    let control: WorkerControl
    let budget: ConnectionBudget
    let table: ConnectionTable
    let pipes: PipePool
    var wheel: TimerWheel
    var listeners: [Listener]
    let configuration: WorkerConfiguration
    let logger: Logger
    var now: UInt64
    var draining = false
    var drainDeadline: UInt64 = .max
    var abortedAtDeadline = false
    var listenersOpen: Int
    /// Slot directions waiting for a buffer after ENOBUFS: slot << 1 | direction, with the
    /// generation, checked when popped (a waiter may have been closed meanwhile).
    var bufferWaiters: [(entry: Int32, generation: UInt32)] = []
    var bufferWaitersHead = 0
    /// Accepted connections waiting for a descriptor for their upstream socket.
    var awaitingDescriptor: [(slot: Int32, generation: UInt32)] = []
    var lastPauseLog: UInt64 = 0
    /// Slots whose timer fired this turn (kept to reuse its storage).
    var expired: [Int32] = []

    /// One logfmt line per closed connection (nil: access log off).
    let accessLogger: Logger?
    /// Per open connection, while the access log is on: who and where, as text.
    var accessInfo: [Int32: (client: String, destination: String)] = [:]

    // SOCKS5 / HTTP CONNECT (see Handshake.swift).
    /// Replaced on reload (new ACL); users stay as loaded at start.
    var policy: GatewayPolicy?
    let offload: OffloadPool?
    let mailbox: WorkerMailbox
    /// The users file's accounts, indexed by `ConnectionSlot.user`.
    let accounts: [UserAccount]
    var sessions: [HandshakeSession] = []
    var freeSessions: [Int32] = []
    /// Per session: the address its connect is submitted with (stable memory, see
    /// `connectNextCandidate`).
    var sessionAddresses: [UnsafeMutablePointer<sockaddr_storage>] = []
    /// Health checks this worker runs (see HealthChecks.swift).
    var probes: [HealthProbe] = []
    /// Each listener's configuration, by index (grows on reload), to re-plan health checks.
    var activeListenerConfigurations: [WorkerListener] = []
    var offloadResults: [OffloadResult] = []
    /// Where handshake bytes are peeked into: the largest HTTP head plus one.
    let scratchSize = HandshakeSession.httpHeadLimit + 1
    let scratch: UnsafeMutableRawPointer


    init(backend: Backend, configuration: WorkerConfiguration, control: WorkerControl,
         statistics: WorkerStatistics, budget: ConnectionBudget, logger: Logger,
         policy: GatewayPolicy? = nil, offload: OffloadPool? = nil, accessLogger: Logger? = nil) {
        self.backend = backend
        self.configuration = configuration
        self.control = control
        self.statistics = statistics
        self.budget = budget
        self.logger = logger
        self.policy = policy
        self.offload = offload
        self.accessLogger = accessLogger
        mailbox = WorkerMailbox(control: control)
        accounts = policy?.accounts ?? []
        scratch = .allocate(byteCount: HandshakeSession.httpHeadLimit + 1, alignment: 16)
        table = ConnectionTable(capacity: configuration.slotCapacity)
        pipes = PipePool(requestedSize: configuration.pipeSize, limit: configuration.maxPipes)
        now = Syscall.monotonicNanoseconds()
        wheel = TimerWheel(now: now)
        listeners = configuration.listeners.map { Self.makeListener($0) }
        listenersOpen = listeners.count
        bufferWaiters.reserveCapacity(256)
        activeListenerConfigurations = configuration.listeners
        probes = Self.makeProbes(listeners: configuration.listeners, worker: configuration.index,
                                 workers: configuration.workerCount, now: now)
    }

    private static func makeListener(_ l: WorkerListener) -> Listener {
        var listener = makeListenerForMode(l)
        listener.acceptProxyProtocol = l.acceptProxyProtocol
        listener.sendProxyProtocol = l.sendProxyProtocol
        listener.proxyHeaderTimeoutNanoseconds = l.proxyHeaderTimeoutNanoseconds
        listener.splice = l.splice
        listener.connectTimeoutNanoseconds = l.connectTimeoutNanoseconds
        listener.idleTimeoutNanoseconds = l.idleTimeoutNanoseconds
        listener.budget = l.budget
        return listener
    }

    private static func makeListenerForMode(_ l: WorkerListener) -> Listener {
        switch l.mode {
        case .forward(let upstream):
            return Listener(fd: l.fd, name: l.name, pool: UpstreamPool(name: l.name, servers: [upstream]))
        case .pool(let pool):
            return Listener(fd: l.fd, name: l.name, pool: pool)
        case .socks5(let options), .httpConnect(let options):
            let kind: GatewayProtocol
            if case .socks5 = l.mode { kind = .socks5 } else { kind = .httpConnect }
            return Listener(fd: l.fd, name: l.name, pool: nil, gateway: kind, gatewayOptions: options)
        }
    }

    deinit {
        scratch.deallocate()
        for a in sessionAddresses { a.deallocate() }
    }

    /// The mailbox offloaded work answers to (the server hands it to the offload jobs).
    var offloadMailbox: WorkerMailbox { mailbox }

    // MARK: - Loop

    func run() throws(SyscallError) {
        for i in listeners.indices { armAccept(i) }
        backend.pollReadable(fd: control.wakeFD, token: OperationToken(index: 0, generation: 0, kind: .wake))
        while true {
            try backend.waitForCompletions(timeoutNanoseconds: nextTimeout())
            now = Syscall.monotonicNanoseconds()
            backend.drainCompletions { handle($0) }
            wheel.expire(now: now, table: table, into: &expired)
            if !expired.isEmpty {
                for s in expired { timerFired(s) }
                expired.removeAll(keepingCapacity: true)
            }
            if !probes.isEmpty { runHealthChecks() }
            resumePausedListeners()
            if bufferWaitersHead < bufferWaiters.count { wakeBufferWaiters() }
            if !awaitingDescriptor.isEmpty { connectWaitingSlots() }
            statistics.set(.buffersInUse, Int64(backend.buffers.inUse))
            statistics.set(.buffersPeak, Int64(backend.buffers.peakInUse))
            statistics.set(.completionOverflows, Int64(backend.completionOverflows))
            statistics.set(.pipesInUse, Int64(pipes.inUse))
            statistics.set(.pipesPeak, Int64(pipes.peakInUse))
            if draining {
                if now >= drainDeadline && !abortedAtDeadline { abortAllAtDeadline() }
                if table.active == 0 && listenersOpen == 0 { break }
            }
        }
    }

    func nextTimeout() -> UInt64? {
        var timeout = wheel.nanosecondsUntilNextTimer(now: now)
        // Index loops: runs every turn, and iterating an array of structs that hold strings
        // allocates in unoptimised builds.
        var i = 0
        while i < listeners.count {
            if listeners[i].open && !listeners[i].acceptArmed && listeners[i].pausedUntil > 0 {
                let t = listeners[i].pausedUntil > now ? listeners[i].pausedUntil - now : 0
                timeout = min(timeout ?? t, t)
            }
            i += 1
        }
        if draining && !abortedAtDeadline {
            let t = drainDeadline > now ? drainDeadline - now : 0
            timeout = min(timeout ?? t, t)
        }
        if !probes.isEmpty, let at = nextHealthCheckEvent() {
            let t = at > now ? at - now : 0
            timeout = min(timeout ?? t, t)
        }
        return timeout
    }

    @inline(__always)
    func handle(_ c: Completion) {
        let t = c.token
        switch t.kind {
        case .accept:
            onAccept(listener: Int(t.index), c)
        case .wake:
            onWake()
        case .closeListener:
            listenersOpen -= 1
        case .healthConnect:
            onHealthConnect(c)
        case .healthClose:
            break
        case .none:
            break
        default:
            onSlotCompletion(c)
        }
    }

    // MARK: - Listeners

    func armAccept(_ i: Int) {
        guard listeners[i].open, !draining else { return }
        listeners[i].acceptArmed = true
        listeners[i].pausedUntil = 0
        backend.accept(listener: listeners[i].fd, token: OperationToken(index: UInt32(i), generation: 0, kind: .accept))
    }

    func resumePausedListeners() {
        var i = 0
        while i < listeners.count {
            if listeners[i].open && listeners[i].pausedUntil > 0 && listeners[i].pausedUntil <= now {
                if !awaitingDescriptor.isEmpty {
                    // Connections already accepted come first: stay paused while one waits
                    // for a descriptor.
                    listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
                } else if !listeners[i].acceptArmed {
                    armAccept(i)
                }
            }
            i += 1
        }
    }

    func onAccept(listener i: Int, _ c: Completion) {
        if !c.more { listeners[i].acceptArmed = false }
        if c.result >= 0 {
            startBridge(client: c.result, listener: i)
            if !c.more { armAccept(i) }
            return
        }
        let e = -c.result
        if e == ECANCELED || !listeners[i].open { return }
        if e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM {
            // Out of descriptors or memory: connections wait in the backlog while some close.
            // Re-arm on a timer instead of spinning on the same error.
            pauseAccepting(errno: e)
            return
        } else {
            statistics.add(.acceptErrors)
            if e == ECONNABORTED || e == EINTR || e == EAGAIN {
                if !c.more { armAccept(i) }
                return
            }
            logger.warning("accept failed", metadata: ["listener": "\(listeners[i].name)", "error": "\(Errno.describe(e))"])
        }
        if !c.more { listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds }
    }

    /// Stops every listener of this worker for 100 ms (descriptors are per process, so all
    /// of them are out). Cancelling the multishot accepts keeps the kernel from accepting
    /// connections there would be no descriptor to bridge.
    func pauseAccepting(errno e: Int32) {
        statistics.add(.acceptPauses)
        var i = 0
        while i < listeners.count {
            if listeners[i].open {
                listeners[i].pausedUntil = now + Self.acceptPauseNanoseconds
                if listeners[i].acceptArmed { backend.cancel(fd: listeners[i].fd) }
            }
            i += 1
        }
        // Once a second at most: the condition lasts as long as the shortage does.
        if now &- lastPauseLog >= 1_000_000_000 {
            lastPauseLog = now
            logger.warning("accept paused for 100 ms", metadata: [
                "error": "\(Errno.describe(e))", "pauses": "\(statistics.load(.acceptPauses))",
            ])
        }
    }

    func startBridge(client: Int32, listener i: Int) {
        if draining { Syscall.close(client); return }
        guard budget.tryAcquire() else {
            statistics.add(.rejectedAtCapacity)
            Syscall.close(client)
            return
        }
        if let listenerBudget = listeners[i].budget, !listenerBudget.tryAcquire() {
            budget.release()
            statistics.add(.rejectedAtCapacity)
            Syscall.close(client)
            return
        }
        guard let s = table.allocate() else {
            budget.release()
            listeners[i].budget?.release()
            statistics.add(.rejectedAtCapacity)
            Syscall.close(client)
            return
        }
        statistics.add(.acceptedTotal)
        statistics.add(.activeConnections)
        statistics.add(listener: i, .accepted)
        statistics.add(listener: i, .active)
        let p = table.pointer(s)
        p.pointee.state = .connecting
        p.pointee.listener = UInt16(i)
        p.pointee.splice = listeners[i].splice
        p.pointee.client = client
        p.pointee.openedAt = now
        p.pointee.lastActivity = now
        // Forwarded bytes go out as they arrive; Nagle would only add latency here.
        _ = try? Syscall.setIntOption(client, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
        if let kind = listeners[i].gateway, let options = listeners[i].gatewayOptions {
            startHandshake(s, p, protocol: kind, options: options, proxyHeader: listeners[i].acceptProxyProtocol)
            return
        }
        if accessLogger != nil {
            let peer = (try? Syscall.peerAddress(client))?.description ?? "-"
            accessInfo[s] = (peer, listeners[i].pool?.name ?? "-")
        }
        if listeners[i].acceptProxyProtocol {
            // Forward listener behind a balancer: read its PROXY header, then connect.
            startHandshake(s, p, protocol: .forward, options: GatewayOptions(requireAuthentication: false,
                           handshakeTimeoutNanoseconds: listeners[i].proxyHeaderTimeoutNanoseconds), proxyHeader: true)
            return
        }
        // The connect timeout also bounds the wait for a descriptor (see `connectUpstream`).
        wheel.schedule(s, deadline: now + listeners[i].connectTimeoutNanoseconds, table: table)
        if !connectUpstream(s) {
            if hasSlotAwaitingDescriptor() {
                // One waiter at a time: if every descriptor were held by waiting clients, none
                // would ever come back. Closing this one frees a descriptor for the oldest.
                statistics.add(.rejectedAtCapacity)
                closeSlot(s, abort: false, reason: .capacity)
            } else {
                awaitingDescriptor.append((s, p.pointee.generation))
            }
        }
    }

    func hasSlotAwaitingDescriptor() -> Bool {
        var k = 0
        while k < awaitingDescriptor.count {
            if stillAwaitingDescriptor(awaitingDescriptor[k]) { return true }
            k += 1
        }
        return false
    }

    /// An entry of `awaitingDescriptor` whose slot has not since timed out, closed or been reused.
    @inline(__always)
    func stillAwaitingDescriptor(_ entry: (slot: Int32, generation: UInt32)) -> Bool {
        let p = table.pointer(entry.slot)
        return p.pointee.generation == entry.generation && p.pointee.state == .connecting && p.pointee.upstream < 0
    }

    /// Opens the upstream socket and starts the connect. Out of descriptors (the accept may
    /// have taken the last one — accept takes a whole burst at once), accepting pauses and
    /// the caller lets the client wait, up to its connect timeout, for a descriptor to come
    /// back. Returns false when there was no descriptor.
    func connectUpstream(_ s: Int32) -> Bool {
        let p = table.pointer(s)
        let l = listeners[Int(p.pointee.listener)]
        guard let pool = l.pool else { closeSlot(s, abort: false, reason: .connectFailed); return true }
        var hash: UInt64 = 0
        if pool.balance == .sourceHash, let peer = try? Syscall.peerAddress(p.pointee.client) {
            let ip = peer.ipAddress
            hash = (ip.high &* 0x9E37_79B9_7F4A_7C15 ^ ip.low) &* 0xBF58_476D_1CE4_E5B9
            hash ^= hash >> 29
        }
        guard let server = pool.pick(tried: p.pointee.triedServers, clientHash: hash) else {
            statistics.add(.connectFailures)
            logger.warning("no server to connect to", metadata: ["listener": "\(l.name)", "pool": "\(pool.name)"])
            closeSlot(s, abort: false, reason: .noServer)
            return true
        }
        let type = Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue | SOCK_NONBLOCK.rawValue)
        let upstream: Int32
        do {
            upstream = try Syscall.socket(family: pool.servers[server].family, type: type)
        } catch where error.errno == EMFILE || error.errno == ENFILE {
            pauseAccepting(errno: error.errno)
            return false
        } catch {
            statistics.add(.connectFailures)
            logger.warning("upstream socket failed", metadata: ["listener": "\(l.name)", "error": "\(error)"])
            closeSlot(s, abort: false, reason: .connectFailed)
            return true
        }
        p.pointee.upstream = upstream
        p.pointee.server = Int16(server)
        p.pointee.triedServers |= 1 << UInt64(server)
        pool.acquire(server)
        _ = try? Syscall.setIntOption(upstream, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
        p.pointee.inflight += 1
        (pool.addresses + server).withMemoryRebound(to: sockaddr.self, capacity: 1) {
            backend.connect(fd: upstream, address: $0, length: pool.servers[server].length, token: token(s, .connect))
        }
        return true
    }

    /// A forward connect failed: the next healthy server not yet tried gets the connection
    /// (within the same connect timeout), or the client is closed.
    func forwardConnectFailed(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, errno e: Int32) {
        statistics.add(.connectFailures)
        let l = listeners[Int(p.pointee.listener)]
        logger.warning("upstream connect failed", metadata: [
            "listener": "\(l.name)", "upstream": "\(serverName(p))", "error": "\(Errno.describe(e))",
        ])
        if p.pointee.server >= 0 {
            l.pool?.release(Int(p.pointee.server))
            p.pointee.server = -1
        }
        // Closed through the backend: the epoll backend keeps per-descriptor state.
        p.pointee.inflight += 1
        backend.cancelAndClose(fd: p.pointee.upstream, token: token(s, .closeUpstream))
        p.pointee.upstream = -1
        if let pool = l.pool, pool.pick(tried: p.pointee.triedServers, clientHash: 0) != nil {
            _ = connectUpstream(s)
            return
        }
        closeSlot(s, abort: false, reason: .connectFailed)
    }

    func serverName(_ p: UnsafeMutablePointer<ConnectionSlot>) -> String {
        guard p.pointee.server >= 0, let pool = listeners[Int(p.pointee.listener)].pool else { return "-" }
        return pool.describe(Int(p.pointee.server))
    }

    /// Once per loop turn while slots wait for a descriptor: oldest first, until one fails.
    func connectWaitingSlots() {
        var k = 0
        while k < awaitingDescriptor.count {
            let entry = awaitingDescriptor[k]
            if stillAwaitingDescriptor(entry) && !connectUpstream(entry.slot) { break }
            k += 1
        }
        awaitingDescriptor.removeFirst(k)
    }

    // MARK: - Drain

    func onWake() {
        backend.consumeWake(fd: control.wakeFD)
        // The eventfd also wakes the loop for offloaded results (names, passwords) and reloads.
        handleOffloadResults()
        for command in control.takeReloads() { applyReload(command) }
        if control.isDrainRequested && !draining { beginDrain() }
        if control.isAbortRequested { drainDeadline = now }
        backend.pollReadable(fd: control.wakeFD, token: OperationToken(index: 0, generation: 0, kind: .wake))
    }

    /// SIGHUP: close removed listeners (their connections carry on), open added ones, take
    /// the new policy for new connections, and re-plan health checks for the pools in use.
    func applyReload(_ command: ReloadCommand) {
        for i in command.remove where i < listeners.count && listeners[i].open {
            listeners[i].open = false
            backend.cancelAndClose(fd: listeners[i].fd, token: OperationToken(index: UInt32(i), generation: 0, kind: .closeListener))
        }
        for l in command.add {
            listeners.append(Self.makeListener(l))
            listenersOpen += 1
            activeListenerConfigurations.append(l)
            if draining {
                listeners[listeners.count - 1].open = false
                backend.cancelAndClose(fd: l.fd, token: OperationToken(index: UInt32(listeners.count - 1), generation: 0, kind: .closeListener))
            } else {
                armAccept(listeners.count - 1)
            }
        }
        policy = command.policy
        stopHealthChecks()
        let open = listeners.indices.filter { listeners[$0].open }.map { activeListenerConfigurations[$0] }
        probes = Self.makeProbes(listeners: open, worker: configuration.index, workers: configuration.workerCount, now: now)
    }

    func beginDrain() {
        draining = true
        stopHealthChecks()
        drainDeadline = now + configuration.drainTimeoutNanoseconds
        for i in listeners.indices where listeners[i].open {
            listeners[i].open = false
            backend.cancelAndClose(fd: listeners[i].fd, token: OperationToken(index: UInt32(i), generation: 0, kind: .closeListener))
        }
    }

    func abortAllAtDeadline() {
        abortedAtDeadline = true
        var s: Int32 = 0
        while s < table.used {
            let state = table.pointer(s).pointee.state
            if state == .handshake || state == .connecting || state == .bridging {
                statistics.add(.drainAborted)
                closeSlot(s, abort: true, reason: .drainDeadline)
            }
            s += 1
        }
    }

    // MARK: - Slots

    @inline(__always)
    func token(_ s: Int32, _ kind: OperationKind) -> OperationToken {
        OperationToken(index: UInt32(s), generation: table.pointer(s).pointee.generation, kind: kind)
    }

    @inline(__always)
    func direction(_ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) -> UnsafeMutablePointer<Direction> {
        UnsafeMutableRawPointer(p).advanced(by: d == 0 ? SlotLayout.toUpstreamOffset : SlotLayout.toClientOffset)
            .assumingMemoryBound(to: Direction.self)
    }

    func onSlotCompletion(_ c: Completion) {
        let s = Int32(bitPattern: c.token.index)
        guard Int(s) < table.capacity, s < table.used else { return }
        let p = table.pointer(s)
        guard p.pointee.generation == c.token.generation, p.pointee.state != .free else {
            // Cannot happen while slots are held until nothing is in flight; never leak a buffer.
            if let b = c.bufferID { backend.releaseBuffer(b) }
            return
        }
        if !c.more { p.pointee.inflight -= 1 }
        switch c.token.kind {
        case .connect: onConnect(s, p, c.result)
        case .recvClient: onRecv(s, p, 0, c)
        case .recvUpstream: onRecv(s, p, 1, c)
        case .sendUpstream, .sendClient:
            let d = c.token.kind == .sendUpstream ? 0 : 1
            if c.more {
                // SEND_ZC: the bytes are sent but the kernel still reads the buffer; act on
                // the result once the notification says the buffer is ours again.
                direction(p, d).pointee.zeroCopyResult = c.result
            } else {
                onSend(s, p, d, c.notification ? direction(p, d).pointee.zeroCopyResult : c.result)
            }
        case .shutdownUpstream: onShutdown(s, p, 0)
        case .shutdownClient: onShutdown(s, p, 1)
        case .pollInClient: onPollIn(s, p, 0, c.result)
        case .pollInUpstream: onPollIn(s, p, 1, c.result)
        case .spliceInClient: onSpliceIn(s, p, 0, c.result)
        case .spliceInUpstream: onSpliceIn(s, p, 1, c.result)
        case .spliceOutUpstream: onSpliceOut(s, p, 0, c.result)
        case .spliceOutClient: onSpliceOut(s, p, 1, c.result)
        case .pollOutUpstream: onPollOut(s, p, 0, c.result)
        case .pollOutClient: onPollOut(s, p, 1, c.result)
        case .handshakeReadable: onHandshakeReadable(s, p, c.result)
        default: break  // closeClient / closeUpstream: only the in-flight count matters
        }
        if p.pointee.state == .closing && p.pointee.inflight == 0 { finish(s) }
    }

    func onConnect(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ result: Int32) {
        guard p.pointee.state == .connecting else { return }
        if p.pointee.session >= 0 {
            // SOCKS5 / HTTP CONNECT: try the next address, or reply and start bridging.
            guard gatewayConnected(s, p, result) else { return }
        } else if result < 0 {
            forwardConnectFailed(s, p, errno: -result)
            return
        }
        if !sendProxyHeader(p) {
            closeSlot(s, abort: true)
            return
        }
        if p.pointee.session >= 0 { releaseSession(p) }
        wheel.cancel(s, table: table)
        // lastActivity holds when the connect was started until the bridge is up.
        statistics.recordConnectLatency(now &- p.pointee.lastActivity)
        p.pointee.state = .bridging
        p.pointee.lastActivity = now
        if let idle = listeners[Int(p.pointee.listener)].idleTimeoutNanoseconds {
            wheel.schedule(s, deadline: now + idle, table: table)
        }
        // A rate-limited user's bytes must pass through user space to be paced.
        let splicing = p.pointee.splice == .always && !p.pointee.rateLimited
        p.pointee.toUpstream.splicing = splicing
        p.pointee.toClient.splicing = splicing
        armReadSide(s, p, 0)
        armReadSide(s, p, 1)
    }

    func timerFired(_ s: Int32) {
        let p = table.pointer(s)
        switch p.pointee.state {
        case .handshake:
            statistics.add(.handshakeTimeouts)
            closeSlot(s, abort: false, reason: .handshakeTimeout)
        case .connecting where p.pointee.session >= 0:
            statistics.add(.connectTimeouts)
            gatewayConnectTimedOut(s, p)
        case .connecting:
            statistics.add(.connectTimeouts)
            let l = listeners[Int(p.pointee.listener)]
            logger.warning("upstream connect timed out", metadata: ["listener": "\(l.name)", "upstream": "\(serverName(p))"])
            closeSlot(s, abort: false, reason: .connectTimeout)
        case .bridging:
            if p.pointee.rateLimited { resumeThrottled(s, p) }
            if let idle = listeners[Int(p.pointee.listener)].idleTimeoutNanoseconds, now &- p.pointee.lastActivity >= idle {
                statistics.add(.idleTimeouts)
                closeSlot(s, abort: false, reason: .idleTimeout)
                return
            }
            scheduleBridgeTimer(s, p)
        default:
            break
        }
    }

    @inline(__always)
    func armRecv(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        direction(p, d).pointee.recvArmed = true
        p.pointee.inflight += 1
        backend.recv(fd: d == 0 ? p.pointee.client : p.pointee.upstream, token: token(s, d == 0 ? .recvClient : .recvUpstream))
    }

    @inline(__always)
    func armSend(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.sendArmed = true
        p.pointee.inflight += 1
        backend.send(fd: d == 0 ? p.pointee.upstream : p.pointee.client, buffer: dir.pointee.sendBuffer,
                     offset: Int(dir.pointee.sendOffset), length: Int(dir.pointee.sendRemaining),
                     token: token(s, d == 0 ? .sendUpstream : .sendClient))
    }

    func onRecv(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ c: Completion) {
        let dir = direction(p, d)
        dir.pointee.recvArmed = false
        guard p.pointee.state == .bridging else {
            if let b = c.bufferID { returnBuffer(b) }
            return
        }
        if c.result > 0, let b = c.bufferID {
            let n = UInt32(c.result)
            dir.pointee.bytes &+= UInt64(n)
            statistics.add(d == 0 ? .bytesClientToUpstream : .bytesUpstreamToClient, Int64(n))
            statistics.add(listener: Int(p.pointee.listener), d == 0 ? .bytesClientToUpstream : .bytesUpstreamToClient, Int64(n))
            p.pointee.lastActivity = now
            let throttled = p.pointee.user >= 0 && accountBytes(s, p, d, Int(n))
            if p.pointee.splice == .auto && !dir.pointee.wantSplice && !p.pointee.rateLimited {
                // Bulk is recognised by reads that fill whole buffers, several in a row;
                // interactive traffic rarely does and stays on copy.
                if Int(n) == backend.buffers.size {
                    dir.pointee.fullReads &+= 1
                    if Int(dir.pointee.fullReads) >= configuration.spliceThreshold { dir.pointee.wantSplice = true }
                } else {
                    dir.pointee.fullReads = 0
                }
            }
            if dir.pointee.sendArmed {
                dir.pointee.queuedBuffer = b
                dir.pointee.queuedLength = n
            } else {
                dir.pointee.sendBuffer = b
                dir.pointee.sendOffset = 0
                dir.pointee.sendRemaining = n
                armSend(s, p, d)
                // One buffer in flight to the writer, one recv ahead of it (unless this
                // direction is about to move to splice: then the copy path drains first).
                if !dir.pointee.wantSplice && !throttled { armRecv(s, p, d) }
            }
            return
        }
        if c.result == 0 {
            dir.pointee.readEOF = true
            if !dir.pointee.sendArmed { queueShutdown(s, p, d) }
            return
        }
        let e = -c.result
        if e == ENOBUFS {
            statistics.add(.bufferExhaustions)
            dir.pointee.waitingForBuffer = true
            bufferWaiters.append((Int32(s) << 1 | Int32(d), p.pointee.generation))
            return
        }
        closeSlot(s, abort: true)  // ECONNRESET, ETIMEDOUT, …: the peer is gone
    }

    func onSend(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.sendArmed = false
        if p.pointee.state != .bridging || result <= 0 {
            returnBuffer(dir.pointee.sendBuffer)
            dir.pointee.sendBuffer = Direction.noBuffer
            if p.pointee.state == .bridging { closeSlot(s, abort: true) }  // EPIPE, ECONNRESET
            return
        }
        let n = UInt32(result)
        if n < dir.pointee.sendRemaining {
            dir.pointee.sendOffset += n
            dir.pointee.sendRemaining -= n
            armSend(s, p, d)
            return
        }
        returnBuffer(dir.pointee.sendBuffer)
        dir.pointee.sendBuffer = Direction.noBuffer
        if dir.pointee.queuedBuffer != Direction.noBuffer {
            dir.pointee.sendBuffer = dir.pointee.queuedBuffer
            dir.pointee.sendOffset = 0
            dir.pointee.sendRemaining = dir.pointee.queuedLength
            dir.pointee.queuedBuffer = Direction.noBuffer
            armSend(s, p, d)
            if !dir.pointee.recvArmed && !dir.pointee.readEOF && !dir.pointee.waitingForBuffer && !dir.pointee.wantSplice
                && dir.pointee.throttledUntil == 0 {
                armRecv(s, p, d)
            }
        } else if dir.pointee.readEOF {
            queueShutdown(s, p, d)
        } else if dir.pointee.wantSplice && !dir.pointee.recvArmed && !dir.pointee.waitingForBuffer {
            // The copy path is empty: from here on this direction splices.
            dir.pointee.wantSplice = false
            dir.pointee.splicing = true
            statistics.add(.spliceSwitches)
            armPollIn(s, p, d)
        }
    }

    // MARK: - Splice path

    @inline(__always)
    func armReadSide(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        if direction(p, d).pointee.splicing { armPollIn(s, p, d) } else { armRecv(s, p, d) }
    }

    /// Wait for the source to be readable before taking a pipe and splicing: an idle
    /// direction holds no pipe, and no splice waits on an empty socket.
    func armPollIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        direction(p, d).pointee.pollInArmed = true
        p.pointee.inflight += 1
        backend.pollReadable(fd: d == 0 ? p.pointee.client : p.pointee.upstream, token: token(s, d == 0 ? .pollInClient : .pollInUpstream))
    }

    func armSpliceIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.spliceInArmed = true
        p.pointee.inflight += 1
        backend.spliceIn(socket: d == 0 ? p.pointee.client : p.pointee.upstream, pipe: dir.pointee.pipeWrite,
                         length: pipes.capacity - Int(dir.pointee.pipeBytes), token: token(s, d == 0 ? .spliceInClient : .spliceInUpstream))
    }

    func armSpliceOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        dir.pointee.spliceOutArmed = true
        p.pointee.inflight += 1
        backend.spliceOut(pipe: dir.pointee.pipeRead, socket: d == 0 ? p.pointee.upstream : p.pointee.client,
                          length: Int(dir.pointee.pipeBytes), token: token(s, d == 0 ? .spliceOutUpstream : .spliceOutClient))
    }

    func armPollOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        direction(p, d).pointee.pollOutArmed = true
        p.pointee.inflight += 1
        backend.pollWritable(fd: d == 0 ? p.pointee.upstream : p.pointee.client, token: token(s, d == 0 ? .pollOutUpstream : .pollOutClient))
    }

    /// The pipe goes back once it is empty and no splice is using it.
    @inline(__always)
    func releasePipeIfIdle(_ dir: UnsafeMutablePointer<Direction>) {
        guard dir.pointee.pipeRead >= 0, dir.pointee.pipeBytes == 0,
              !dir.pointee.spliceInArmed, !dir.pointee.spliceOutArmed, !dir.pointee.pollOutArmed else { return }
        pipes.giveBack(PipePool.Pipe(read: dir.pointee.pipeRead, write: dir.pointee.pipeWrite), empty: true)
        dir.pointee.pipeRead = -1
        dir.pointee.pipeWrite = -1
    }

    func onPollIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.pollInArmed = false
        guard p.pointee.state == .bridging else { return }
        if result < 0 { closeSlot(s, abort: true); return }
        if dir.pointee.pipeRead < 0 {
            guard let pipe = pipes.borrow() else {
                // No pipe to be had (budget, descriptors, pipe-user-pages-soft): this
                // direction stays on copy; the connection never fails for it.
                dir.pointee.splicing = false
                statistics.add(.pipeFallbacks)
                armRecv(s, p, d)
                return
            }
            dir.pointee.pipeRead = pipe.read
            dir.pointee.pipeWrite = pipe.write
        }
        armSpliceIn(s, p, d)
    }

    func onSpliceIn(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.spliceInArmed = false
        // Kept exact even while closing: it decides whether the pipe may be reused.
        if result > 0 { dir.pointee.pipeBytes += UInt32(result) }
        guard p.pointee.state == .bridging else {
            closeDeferredSockets(s, p)
            return
        }
        if result > 0 {
            let n = UInt32(result)
            dir.pointee.bytes &+= UInt64(n)
            statistics.add(d == 0 ? .bytesClientToUpstream : .bytesUpstreamToClient, Int64(n))
            statistics.add(listener: Int(p.pointee.listener), d == 0 ? .bytesClientToUpstream : .bytesUpstreamToClient, Int64(n))
            p.pointee.lastActivity = now
            if p.pointee.user >= 0 { _ = accountBytes(s, p, d, Int(n)) }
            if !dir.pointee.spliceOutArmed && !dir.pointee.pollOutArmed { armSpliceOut(s, p, d) }
            // A full pipe waits for the writer; reading resumes as it drains.
            if Int(dir.pointee.pipeBytes) < pipes.capacity { armPollIn(s, p, d) }
            return
        }
        if result == 0 {
            dir.pointee.readEOF = true
            if dir.pointee.pipeBytes == 0 && !dir.pointee.spliceOutArmed && !dir.pointee.pollOutArmed {
                releasePipeIfIdle(dir)
                queueShutdown(s, p, d)
            }
            return
        }
        if result == -EAGAIN {
            statistics.add(.spliceWouldBlock)
            releasePipeIfIdle(dir)
            armPollIn(s, p, d)
            return
        }
        closeSlot(s, abort: true)
    }

    func onSpliceOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        let dir = direction(p, d)
        dir.pointee.spliceOutArmed = false
        if result > 0 { dir.pointee.pipeBytes -= UInt32(result) }
        guard p.pointee.state == .bridging else {
            closeDeferredSockets(s, p)
            return
        }
        if result > 0 {
            statistics.add(.spliceBytes, Int64(result))
            if dir.pointee.pipeBytes > 0 {
                armSpliceOut(s, p, d)
            } else if dir.pointee.readEOF {
                releasePipeIfIdle(dir)
                queueShutdown(s, p, d)
                return
            } else {
                releasePipeIfIdle(dir)
            }
            if !dir.pointee.readEOF && !dir.pointee.pollInArmed && !dir.pointee.spliceInArmed
                && Int(dir.pointee.pipeBytes) < pipes.capacity {
                armPollIn(s, p, d)
            }
            return
        }
        if result == -EAGAIN {
            statistics.add(.spliceWouldBlock)
            armPollOut(s, p, d)
            return
        }
        closeSlot(s, abort: true)  // EPIPE, ECONNRESET, or 0 with bytes still in the pipe
    }

    func onPollOut(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int, _ result: Int32) {
        direction(p, d).pointee.pollOutArmed = false
        guard p.pointee.state == .bridging else { return }
        if result < 0 { closeSlot(s, abort: true); return }
        armSpliceOut(s, p, d)
    }

    func queueShutdown(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        let dir = direction(p, d)
        guard !dir.pointee.shutdownQueued else { return }
        dir.pointee.shutdownQueued = true
        p.pointee.inflight += 1
        if d == 0 {
            backend.shutdownWrite(fd: p.pointee.upstream, token: token(s, .shutdownUpstream))
        } else {
            backend.shutdownWrite(fd: p.pointee.client, token: token(s, .shutdownClient))
        }
    }

    func onShutdown(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) {
        direction(p, d).pointee.finished = true
        guard p.pointee.state == .bridging else { return }
        if p.pointee.toUpstream.finished && p.pointee.toClient.finished {
            statistics.add(.closedGracefully)
            closeSlot(s, abort: false, reason: .eof)
        }
    }

    @inline(__always)
    func returnBuffer(_ b: UInt16) {
        guard b != Direction.noBuffer else { return }
        backend.releaseBuffer(b)
    }

    /// Once per loop turn: re-arm the recv of as many ENOBUFS waiters (oldest first) as there
    /// are free buffers. Not one waiter per returned buffer: a woken recv that finds no data
    /// (io_uring picks the buffer before it looks for data, so ENOBUFS does not prove bytes
    /// were waiting) takes no buffer, and the rest of the queue must not wait on it.
    func wakeBufferWaiters() {
        var budget = backend.buffers.available
        while budget > 0 && bufferWaitersHead < bufferWaiters.count {
            let (entry, generation) = bufferWaiters[bufferWaitersHead]
            bufferWaitersHead += 1
            let ws = entry >> 1
            let wd = Int(entry & 1)
            let wp = table.pointer(ws)
            let wdir = direction(wp, wd)
            if wp.pointee.generation == generation && wp.pointee.state == .bridging && wdir.pointee.waitingForBuffer {
                wdir.pointee.waitingForBuffer = false
                armRecv(ws, wp, wd)
                budget -= 1
            }
        }
        if bufferWaitersHead == bufferWaiters.count {
            bufferWaiters.removeAll(keepingCapacity: true)
            bufferWaitersHead = 0
        }
    }

    /// Closes both sockets (RST when `abort`), cancelling what is pending on them; the slot
    /// is reused once every operation on it has completed.
    func closeSlot(_ s: Int32, abort: Bool, reason: CloseReason? = nil) {
        let p = table.pointer(s)
        guard p.pointee.state != .closing && p.pointee.state != .free else { return }
        if p.pointee.closeReason == .unknown {
            p.pointee.closeReason = reason ?? (abort ? .reset : p.pointee.state == .handshake ? .clientGone : .unknown)
        }
        if p.pointee.timerBucket >= 0 { wheel.cancel(s, table: table) }
        if abort && p.pointee.state == .bridging { statistics.add(.closedAborted) }
        p.pointee.state = .closing
        p.pointee.aborted = abort
        for d in 0..<2 {
            let dir = direction(p, d)
            dir.pointee.waitingForBuffer = false
            returnBuffer(dir.pointee.queuedBuffer)
            dir.pointee.queuedBuffer = Direction.noBuffer
            // A buffer being sent goes back when its send completes (the kernel reads it).
        }
        if p.pointee.client >= 0 {
            if abort { Syscall.setLingerZero(p.pointee.client) }
            closeSocket(s, p, 0)
        }
        if p.pointee.upstream >= 0 {
            if abort { Syscall.setLingerZero(p.pointee.upstream) }
            closeSocket(s, p, 1)
        }
        if p.pointee.inflight == 0 { finish(s) }
    }

    /// Closes the client (`side` 0) or upstream (1) socket.
    ///
    /// Not while a splice uses it: io_uring runs splices on io-wq threads and looks their
    /// descriptors up by number only then, not at submission. Closed early, the number could
    /// be reused by a new connection's socket before the splice runs, which would then move
    /// bytes into or out of the wrong connection (the soak test caught streams starting with
    /// another connection's bytes). So the socket is shut down — a pending splice finds EOF or
    /// EPIPE at once — and the close waits for the splice's completion (`closeDeferredSockets`).
    private func closeSocket(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>, _ side: Int) {
        let fd = side == 0 ? p.pointee.client : p.pointee.upstream
        if socketHasSplice(p, side) {
            _ = Syscall.shutdown(fd, Int32(SHUT_RDWR))
            if side == 0 { p.pointee.clientCloseDeferred = true } else { p.pointee.upstreamCloseDeferred = true }
            return
        }
        p.pointee.inflight += 1
        backend.cancelAndClose(fd: fd, token: token(s, side == 0 ? .closeClient : .closeUpstream))
    }

    /// A splice reading from this socket (its own direction's splice-in) or writing to it
    /// (the other direction's splice-out) is in flight.
    @inline(__always)
    private func socketHasSplice(_ p: UnsafeMutablePointer<ConnectionSlot>, _ side: Int) -> Bool {
        direction(p, side).pointee.spliceInArmed || direction(p, 1 - side).pointee.spliceOutArmed
    }

    /// After a splice completes on a closing slot: the closes it held back.
    private func closeDeferredSockets(_ s: Int32, _ p: UnsafeMutablePointer<ConnectionSlot>) {
        if p.pointee.clientCloseDeferred && !socketHasSplice(p, 0) {
            p.pointee.clientCloseDeferred = false
            closeSocket(s, p, 0)
        }
        if p.pointee.upstreamCloseDeferred && !socketHasSplice(p, 1) {
            p.pointee.upstreamCloseDeferred = false
            closeSocket(s, p, 1)
        }
    }

    func finish(_ s: Int32) {
        let p = table.pointer(s)
        if let accessLogger { logAccess(s, p, accessLogger) }
        for d in 0..<2 {
            let dir = direction(p, d)
            guard dir.pointee.pipeRead >= 0 else { continue }
            // Nothing is in flight now. Bytes left in the pipe of an aborted bridge are lost
            // with it: counted, and the pipe is closed rather than reused.
            if dir.pointee.pipeBytes > 0 { statistics.add(.spliceBytesDropped, Int64(dir.pointee.pipeBytes)) }
            pipes.giveBack(PipePool.Pipe(read: dir.pointee.pipeRead, write: dir.pointee.pipeWrite), empty: dir.pointee.pipeBytes == 0)
            dir.pointee.pipeRead = -1
            dir.pointee.pipeWrite = -1
        }
        if p.pointee.session >= 0 { releaseSession(p) }
        if p.pointee.user >= 0 {
            accounts[Int(p.pointee.user)].releaseConnection()
            p.pointee.user = -1
        }
        if p.pointee.server >= 0 {
            listeners[Int(p.pointee.listener)].pool?.release(Int(p.pointee.server))
            p.pointee.server = -1
        }
        statistics.add(listener: Int(p.pointee.listener), .active, -1)
        listeners[Int(p.pointee.listener)].budget?.release()
        table.release(s)
        budget.release()
        statistics.add(.activeConnections, -1)
    }
}
