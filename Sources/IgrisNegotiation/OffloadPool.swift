import Glibc
import IgrisEngine
import IgrisPolicy
import Synchronization

/// A few threads for work a worker must never block on: getaddrinfo and argon2id. Jobs are
/// closures (one per handshake step, never per forwarded byte); each posts its result to
/// the submitting worker's `WorkerMailbox`.
public final class OffloadPool: Sendable {
    public typealias Job = @Sendable () -> Void

    private let shared = Shared()
    private let threads: [pthread_t]

    public init(threads count: Int, name: String = "igris-offload") {
        let shared = shared
        threads = (0..<max(1, count)).map { i in
            WorkerThread.spawn(name: "\(name)\(i)") { shared.runJobs() }
        }
    }

    public func submit(_ job: @escaping Job) { shared.submit(job) }

    /// Runs what is queued, then joins the threads.
    public func shutdown() {
        guard shared.stop(threads: threads.count) else { return }
        for t in threads { pthread_join(t, nil) }
    }

    /// The queue the threads share: jobs under a mutex, a semaphore counting them.
    private final class Shared: @unchecked Sendable {
        private struct Queue {
            var jobs: [Job] = []
            var head = 0
            var stopping = false
        }

        private let queue = Locked<Queue>(Queue())
        /// Posted once per job (and once per thread at shutdown); threads sleep on it.
        private let available: UnsafeMutablePointer<sem_t>

        init() {
            available = .allocate(capacity: 1)
            sem_init(available, 0, 0)
        }

        deinit {
            sem_destroy(available)
            available.deallocate()
        }

        func submit(_ job: @escaping Job) {
            queue.withLock { $0.jobs.append(job) }
            sem_post(available)
        }

        /// False when already stopping.
        func stop(threads: Int) -> Bool {
            let first = queue.withLock { q -> Bool in
                defer { q.stopping = true }
                return !q.stopping
            }
            if first { for _ in 0..<threads { sem_post(available) } }
            return first
        }

        func runJobs() {
            while true {
                while sem_wait(available) != 0 {}  // EINTR
                let job = queue.withLock { q -> Job? in
                    guard q.head < q.jobs.count else { return nil }
                    let j = q.jobs[q.head]
                    q.head += 1
                    if q.head == q.jobs.count {
                        q.jobs.removeAll(keepingCapacity: true)
                        q.head = 0
                    }
                    return j
                }
                if let job { job(); continue }
                if queue.withLock({ $0.stopping }) { return }
            }
        }
    }
}

