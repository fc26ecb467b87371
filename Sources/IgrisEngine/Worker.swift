import Glibc
import Logging
import IgrisPolicy
import IgrisProtocols
import IgrisTLS

/// Per-worker settings.
public struct WorkerConfiguration: Sendable {
    public var index: Int
    public var listeners: [BoundListener]
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
    /// Each listening socket's backlog: what one multishot accept may take at once.
    public var listenBacklog: Int = 4096
    /// `ServerConfiguration.busyPollNanoseconds`.
    public var busyPollNanoseconds: UInt64 = 0
    /// The users file's accounts (per-user limits and counters), indexed by
    /// `Negotiation.account`.
    public var accounts: [UserAccount] = []
    /// Per-source and handshake-phase bounds, shared by every worker.
    public var sourceLimits = SourceLimits(.init())
    /// Where UDP relays bind (`ServerConfiguration.udpRelayPorts`).
    public var udpRelayPorts: ClosedRange<UInt16>? = nil
}

/// One worker thread: its backend, connection table, timers and listeners. Its subsystems
/// are extensions, one file each: EventLoop (run, wake, reload, drain), Acceptor,
/// Negotiating, TLSLayer, Connector, Bridge (copy path, half-close, close), Splice,
/// HealthChecks.
///
/// Generic over the backend so every I/O call is statically dispatched; confined to the
/// thread that created it (the io_uring ring is `SINGLE_ISSUER`), so nothing here is locked.
final class Worker<Backend: IOBackend> {
    struct Listener {
        var bound: BoundListener
        var open = true
        var acceptArmed = false
        /// The armed accept is multishot (room for many more) rather than one at a time.
        var acceptMultishot = false
        /// A multishot accept is being cancelled to go on one at a time (room is short).
        var narrowingAccept = false
        /// No room (max_connections, slots): connections wait in the backlog until a slot frees.
        var waitingForRoom = false
        /// A connection accepted when another worker took the last place first (the budgets
        /// are shared): it waits here for room, unanswered like those in the backlog, rather
        /// than being closed. At most one per listener: no accept is armed while it waits.
        var heldClient: Int32 = -1
        var pausedUntil: UInt64 = 0

        var fd: Int32 { bound.fd }
        var name: String { bound.rule.name }
        var pool: UpstreamPool? { bound.rule.pool }
        var splice: SpliceMode { bound.rule.splice ?? .auto }
        var connectTimeoutNanoseconds: UInt64 { bound.rule.connectTimeoutNanoseconds ?? 5_000_000_000 }
        var idleTimeoutNanoseconds: UInt64? { bound.rule.idleTimeoutNanoseconds ?? nil }
        var deadPeerTimeoutNanoseconds: UInt64? { bound.rule.deadPeerTimeoutNanoseconds ?? nil }
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
    /// Directions that wait for the pool to be out of its reserve (`Worker.reserveRead`).
    var reserveWaiters: [(entry: Int32, generation: UInt32)] = []
    /// Accepted connections waiting for a descriptor for their upstream socket.
    var awaitingDescriptor: [(slot: Int32, generation: UInt32)] = []
    var lastPauseLog: UInt64 = 0
    /// When accepting last paused for lack of descriptors or memory (0: never).
    var lastPause: UInt64 = 0
    /// Until then (loop clock) accepts are single and resumes check for descriptors first.
    var descriptorsShortUntil: UInt64 = 0
    /// The last accepted client's descriptor number (see `nearDescriptorLimit`).
    var lastAcceptedFD: Int32 = 0
    /// When the buffer pool next sets its target (loop clock).
    var nextBufferAdjustment: UInt64 = 0
    /// Slots whose timer fired this turn (kept to reuse its storage).
    var expired: [Int32] = []

    /// One line per closed connection (nil: access log off), flushed once per loop turn.
    let accessLogger: (any AccessLogSink)?
    var accessLogPending = false
    /// Per open connection, while the access log is on: who and where, as text.
    var accessInfo: [Int32: (client: String, destination: String)] = [:]

    // Negotiations (see Negotiating.swift).
    let mailbox: WorkerMailbox
    /// The users file's accounts, indexed by `ConnectionSlot.user` (append-only on reload).
    var accounts: [UserAccount] { didSet { accountIndex = Self.index(accounts) } }
    /// Account index by name, for client certificates that name their user.
    var accountIndex: [String: Int32] = [:]
    /// When the next account expires (loop clock; .max: none does).
    var nextAccountExpiry: UInt64 = .max
    /// The last turn handled completions: the next wait may poll first (`busyPollNanoseconds`).
    var busy = false
    /// The source each counted slot is charged to (see `SourceLimits`).
    var sourceKeys: [Int32: IPAddress] = [:]
    /// When a refusal at a source limit was last logged (at most one line a second).
    var lastSourceLimitLog: UInt64 = 0
    /// Counted handshakes in the order they began, from `handshakeOrderHead` (entries are
    /// checked when reached: most have finished by then).
    var handshakeOrder: [(slot: Int32, generation: UInt32)] = []
    var handshakeOrderHead = 0
    /// Counted handshakes open on this worker now.
    var handshakesActive = 0
    /// UDP associations by their control connection's slot (`UDPRelay.swift`).
    var associations: [Int32: UDPAssociation] = [:]
    /// Where datagrams are received and sent from (`datagramSlots`).
    var datagramBatchStorage: DatagramBatch?
    /// Datagrams a backend delivered this turn, queued for `deliveredFD` (`UDPRelay.swift`),
    /// and the buffers they are in.
    var deliveredBatchStorage: DatagramBatch?
    var deliveredFD: Int32 = -1
    var deliveredDirection = 0
    var deliveredBuffers: [UInt16] = []
    /// TLS sessions of the slots whose client side (`TLSSides.client`) or upstream side
    /// (`TLSSides.upstream`) speaks TLS (`TLSLayer.swift`).
    var clientTLS: [Int32: TLSSession] = [:]
    var upstreamTLS: [Int32: TLSSession] = [:]
    /// Slots with `framedUpload`: where the client's request body ends.
    var uploadFramings: [Int32: HTTPBodyFraming] = [:]
    /// Indexed by `ConnectionSlot.session`; reused through `freeNegotiations`.
    var negotiations: [(any Negotiation)?] = []
    var freeNegotiations: [Int32] = []
    /// Per negotiation: the address its connect is submitted with (io_uring reads it at
    /// submission, the next loop turn, so it must outlive the call that queued it).
    var connectAddresses: [UnsafeMutablePointer<sockaddr_storage>] = []
    var mailboxItems: [MailboxItem] = []
    /// Where a client's negotiation bytes are peeked into.
    static var scratchSize: Int { 16 * 1024 }
    let scratch: UnsafeMutableRawPointer

    /// Health checks this worker runs (see HealthChecks.swift).
    var probes: [HealthProbe] = []

    init(backend: Backend, configuration: WorkerConfiguration, control: WorkerControl,
         statistics: WorkerStatistics, budget: ConnectionBudget, logger: Logger, accessLogger: (any AccessLogSink)? = nil) {
        self.backend = backend
        self.configuration = configuration
        self.control = control
        self.statistics = statistics
        self.budget = budget
        self.logger = logger
        self.accessLogger = accessLogger
        mailbox = WorkerMailbox(control: control)
        accounts = configuration.accounts
        accountIndex = Self.index(accounts)
        scratch = .allocate(byteCount: Self.scratchSize, alignment: 16)
        table = ConnectionTable(capacity: configuration.slotCapacity)
        pipes = PipePool(requestedSize: configuration.pipeSize, limit: configuration.maxPipes)
        now = Syscall.monotonicNanoseconds()
        wheel = TimerWheel(now: now)
        listeners = configuration.listeners.map { Listener(bound: $0) }
        listenersOpen = listeners.count
        bufferWaiters.reserveCapacity(256)
        probes = Self.makeProbes(listeners: configuration.listeners.map(\.rule), worker: configuration.index,
                                 workers: configuration.workerCount, now: now)
    }

    static func index(_ accounts: [UserAccount]) -> [String: Int32] {
        var index: [String: Int32] = [:]
        for (i, a) in accounts.enumerated() { index[a.name] = Int32(i) }
        return index
    }

    deinit {
        scratch.deallocate()
        for a in connectAddresses { a.deallocate() }
    }

    // MARK: - Tokens and slots

    @inline(__always)
    func token(_ s: Int32, _ kind: OperationKind, _ d: Int = 0) -> OperationToken {
        OperationToken(index: UInt32(s), generation: table.pointer(s).pointee.generation, kind: kind, direction: d)
    }

    @inline(__always)
    func direction(_ p: UnsafeMutablePointer<ConnectionSlot>, _ d: Int) -> UnsafeMutablePointer<Direction> {
        UnsafeMutableRawPointer(p).advanced(by: d == 0 ? SlotLayout.toUpstreamOffset : SlotLayout.toClientOffset)
            .assumingMemoryBound(to: Direction.self)
    }

    /// Routes a completion for a connection to its subsystem; a completion for a slot that
    /// has since been reused (older generation) is dropped.
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
        let d = c.token.direction
        switch c.token.kind {
        case .recv: onRecv(s, p, d, c)
        case .send: onSend(s, p, d, c.result)
        case .pollIn: onPollIn(s, p, d, c.result)
        case .spliceIn: onSpliceIn(s, p, d, c.result)
        case .spliceOut: onSpliceOut(s, p, d, c.result)
        case .pollOut: onPollOut(s, p, d, c.result)
        case .room: onRoom(s, p, d, c.result)
        case .shutdown: onShutdown(s, p, d)
        case .connect: onConnect(s, p, c.result)
        case .negotiationReadable:
            if d == 1 { onUpstreamTLSReadable(s, p, c.result) }
            else if p.pointee.state == .associated { onControlReadable(s, p, c.result) } else { onNegotiationReadable(s, p, c.result) }
        case .datagramReadable: onDatagramReadable(s, p, d, c)
        default: break  // close: only the in-flight count matters
        }
        if p.pointee.state == .closing && p.pointee.inflight == 0 { finish(s) }
    }
}

/// Byte offsets of the two directions inside a slot, computed once: a key path evaluated
/// per operation would allocate.
enum SlotLayout {
    static let toUpstreamOffset = MemoryLayout<ConnectionSlot>.offset(of: \ConnectionSlot.toUpstream)!
    static let toClientOffset = MemoryLayout<ConnectionSlot>.offset(of: \ConnectionSlot.toClient)!
}
