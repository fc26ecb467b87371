import Glibc

/// Blocks the given signals in the calling thread (and so in every thread it starts
/// afterwards) and, once started, receives them with sigwait on a thread of its own.
struct SignalWaiter: Sendable {
    let signals: [Int32]

    init(signals: [Int32]) {
        self.signals = signals
        var set = Self.makeSet(signals)
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    private static func makeSet(_ signals: [Int32]) -> sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        return set
    }

    /// Calls `handler(n, signal)` for the n-th signal received, forever.
    func start(_ handler: @escaping @Sendable (Int, Int32) -> Void) {
        let signals = self.signals
        let box = Unmanaged.passRetained(Box { 
            var set = SignalWaiter.makeSet(signals)
            var count = 0
            while true {
                var received: Int32 = 0
                if sigwait(&set, &received) == 0 {
                    count += 1
                    handler(count, received)
                }
            }
        }).toOpaque()
        var thread = pthread_t()
        pthread_create(&thread, nil, { raw in
            Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, box)
        pthread_detach(thread)
    }

    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
}
