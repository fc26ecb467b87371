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
    private let accountsUpdate = Locked<[UserAccount]?>(nil)

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

    /// SIGHUP: listeners to add and remove; applied at the worker's next turn.
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

    /// A users-file reload: the accounts as they are now (the old ones at their indices).
    func requestAccounts(_ accounts: [UserAccount]) {
        accountsUpdate.withLock { $0 = accounts }
        Syscall.signalEventFD(wakeFD)
    }

    func takeAccounts() -> [UserAccount]? {
        accountsUpdate.withLock { a in
            defer { a = nil }
            return a
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
    var add: [BoundListener]
    /// Server listener indices to close.
    var remove: [Int]
}

/// Values posted to one worker from other threads (negotiation results), and how it is
/// woken: the worker's eventfd, which its loop already polls.
final class WorkerMailbox: Sendable {
    private let items = Locked<[MailboxItem]>([])
    private let control: WorkerControl

    init(control: WorkerControl) { self.control = control }

    func post(_ item: MailboxItem) {
        items.withLock { $0.append(item) }
        Syscall.signalEventFD(control.wakeFD)
    }

    /// Moves everything posted so far into `into` (whose storage is reused).
    func take(into out: inout [MailboxItem]) {
        items.withLock { swap(&$0, &out) }
    }
}

/// A posted value, tagged with the slot it is for and the slot's generation, so a value
/// for a connection that has since closed is dropped.
struct MailboxItem: Sendable {
    var slot: Int32
    var generation: UInt32
    var value: any Sendable
}
