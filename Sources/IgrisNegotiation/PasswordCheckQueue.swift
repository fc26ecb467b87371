import Glibc
import IgrisEngine
import IgrisPolicy

/// argon2id checks on their own threads, apart from name resolution, so a password-guessing
/// flood never delays a DNS answer (nor the reverse).
///
/// The queue is bounded and fair:
/// - it serves sources round-robin (one check per source in turn), so a newcomer waits
///   behind at most one check of each other source, however many a flood has queued;
/// - a source has at most `perSource` checks waiting; more are refused at once;
/// - when the whole queue is full, the source with the most waiting loses its newest;
/// - a check whose connection has closed meanwhile is skipped when its turn comes.
///
/// A refused check is answered (`Job.refuse`), never left hanging.
///
/// `@unchecked`: the one non-Sendable member is the semaphore, used only through sem_post
/// and sem_wait, which are thread-safe; everything else is behind `Locked`.
public final class PasswordCheckQueue: @unchecked Sendable {
    public struct Job: Sendable {
        /// Whose turn this is: a source's `failureKey`.
        public var source: IPAddress
        public var run: @Sendable () -> Void
        /// Called instead of `run` when the queue has no room for it.
        public var refuse: @Sendable () -> Void
        /// Asked when its turn comes: false (its connection closed) skips it.
        public var wanted: @Sendable () -> Bool

        public init(source: IPAddress, run: @escaping @Sendable () -> Void, refuse: @escaping @Sendable () -> Void,
                    wanted: @escaping @Sendable () -> Bool = { true }) {
            self.source = source
            self.run = run
            self.refuse = refuse
            self.wanted = wanted
        }
    }

    public let capacity: Int
    public let perSource: Int
    private let state: Locked<State>
    private let available: UnsafeMutablePointer<sem_t>
    private let threads: Locked<[pthread_t]>
    private let refusals = Locked<Int64>(0)
    private let skips = Locked<Int64>(0)

    private struct State {
        var waiting: [IPAddress: [Job]] = [:]
        /// Sources with checks waiting, in turn order; `next` is whose turn comes first.
        var turns: [IPAddress] = []
        var next = 0
        var count = 0
        var stopping = false
    }

    public init(threads count: Int, capacity: Int = 256, perSource: Int = 8) {
        self.capacity = max(1, capacity)
        self.perSource = max(1, perSource)
        state = Locked(State())
        available = .allocate(capacity: 1)
        sem_init(available, 0, 0)
        threads = Locked([])
        let spawned = (0..<max(1, count)).map { [self] i in
            WorkerThread.spawn(name: "igris-kdf\(i)") { self.runJobs() }
        }
        threads.withLock { $0 = spawned }
    }

    deinit {
        sem_destroy(available)
        available.deallocate()
    }

    public func submit(_ job: Job) {
        enum Admission { case queued, refused, queuedEvicting(Job) }
        let admission: Admission = state.withLock { s in
            if s.stopping { return .refused }
            let mine = s.waiting[job.source]?.count ?? 0
            if mine >= perSource { return .refused }
            var evicted: Job? = nil
            if s.count >= capacity {
                // Full: the heaviest source gives up its newest, unless nobody would have
                // more waiting than this source then (this one is refused instead).
                guard let heaviest = s.waiting.max(by: { $0.value.count < $1.value.count }), heaviest.value.count > mine + 1 else { return .refused }
                evicted = s.waiting[heaviest.key]!.removeLast()
                s.count -= 1
            }
            if s.waiting[job.source] == nil {
                s.waiting[job.source] = [job]
                // Last in turn order: just before the source whose turn is next.
                s.turns.insert(job.source, at: s.next)
                s.next += 1
                if s.next >= s.turns.count { s.next = 0 }
            } else {
                s.waiting[job.source]!.append(job)
            }
            s.count += 1
            return evicted.map { .queuedEvicting($0) } ?? .queued
        }
        switch admission {
        case .refused:
            refusals.withLock { $0 += 1 }
            job.refuse()
        case .queuedEvicting(let evicted):
            refusals.withLock { $0 += 1 }
            evicted.refuse()
            sem_post(available)
        case .queued:
            sem_post(available)
        }
    }

    /// Checks refused for want of room (metrics).
    public var refusedCount: Int64 { refusals.withLock { $0 } }

    /// Checks skipped because their connection had closed (metrics).
    public var skippedCount: Int64 { skips.withLock { $0 } }

    /// Checks waiting now.
    public var waitingCount: Int { state.withLock { $0.count } }

    /// Runs what is queued, then joins the threads.
    public func shutdown() {
        let (first, list) = state.withLock { s -> (Bool, [pthread_t]) in
            defer { s.stopping = true }
            return (!s.stopping, threads.withLock { $0 })
        }
        guard first else { return }
        for _ in list { sem_post(available) }
        for t in list { pthread_join(t, nil) }
    }

    private func take() -> Job? {
        state.withLock { s -> Job? in
            guard !s.turns.isEmpty else { return nil }
            if s.next >= s.turns.count { s.next = 0 }
            let source = s.turns[s.next]
            let job = s.waiting[source]!.removeFirst()
            s.count -= 1
            if s.waiting[source]!.isEmpty {
                s.waiting[source] = nil
                s.turns.remove(at: s.next)
            } else {
                s.next += 1
            }
            if s.next >= s.turns.count { s.next = 0 }
            return job
        }
    }

    private func runJobs() {
        while true {
            while sem_wait(available) != 0 {}  // EINTR
            if let job = take() {
                if job.wanted() { job.run() } else { skips.withLock { $0 += 1 } }
                continue
            }
            if state.withLock({ $0.stopping }) { return }
        }
    }
}
