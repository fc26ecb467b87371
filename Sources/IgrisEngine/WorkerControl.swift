import Glibc
import IgrisPolicy
import Synchronization

/// How the main thread talks to a running worker: flags plus an eventfd the worker polls.
/// Nothing here is touched on the data path.
public final class WorkerControl: Sendable {
    let wakeFD: Int32
    private let drainRequested = Atomic<Bool>(false)
    private let reloads = Locked<[ReloadCommand]>([])
    private let abortRequested = Atomic<Bool>(false)

    init() throws(SyscallError) {
        wakeFD = try Syscall.eventfd()
    }

    deinit { Syscall.close(wakeFD) }

    /// Stop accepting, close listeners, let bridges finish up to the drain deadline.
    func requestDrain() {
        drainRequested.store(true, ordering: .releasing)
        Syscall.signalEventFD(wakeFD)
    }

    /// Drain deadline now: abort whatever is still open.
    func requestAbort() {
        abortRequested.store(true, ordering: .releasing)
        drainRequested.store(true, ordering: .releasing)
        Syscall.signalEventFD(wakeFD)
    }

    /// SIGHUP: listeners to add and remove, the new policy; applied at the worker's next turn.
    func requestReload(_ command: ReloadCommand) {
        reloads.withLock { $0.append(command) }
        Syscall.signalEventFD(wakeFD)
    }

    func takeReloads() -> [ReloadCommand] {
        reloads.withLock { r in
            defer { r.removeAll() }
            return r
        }
    }

    var isDrainRequested: Bool { drainRequested.load(ordering: .acquiring) }
    var isAbortRequested: Bool { abortRequested.load(ordering: .acquiring) }
}

/// The global `--max-connections` cap, shared by all workers. Touched once per accepted
/// and once per closed connection, never per byte.
public final class ConnectionBudget: Sendable {
    public let limit: Int
    private let used = Atomic<Int>(0)

    public init(limit: Int) { self.limit = limit }

    func tryAcquire() -> Bool {
        if used.wrappingAdd(1, ordering: .relaxed).newValue > limit {
            used.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        return true
    }

    func release() { used.wrappingSubtract(1, ordering: .relaxed) }

    public var current: Int { used.load(ordering: .relaxed) }
}

/// What a configuration reload changes on one worker. Listeners are never renumbered: a
/// removed one is closed and stays in the table (its open connections keep their index).
struct ReloadCommand: Sendable {
    /// New listeners with this worker's own SO_REUSEPORT sockets, in server index order.
    var add: [WorkerListener]
    /// Server listener indices to close.
    var remove: [Int]
    var policy: GatewayPolicy
}
