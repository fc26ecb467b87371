import Synchronization

/// A token bucket for one user and direction, shared by every worker, as GCRA (the
/// "virtual scheduling" form): one atomic holds the theoretical arrival time of the next
/// byte. Bytes already read are charged after the fact and the reader is told how long to
/// pause its recv side — nothing is ever buffered to enforce a limit.
public final class RateLimiter: Sendable {
    /// 0: unlimited. Changed by a users-file reload, read by every worker.
    private let rate: Atomic<UInt64>
    /// How far ahead of schedule a user may run before pausing: absorbs the timer wheel's
    /// 10 ms ticks and lets a short burst through at full speed.
    public let burstNanoseconds: UInt64
    private let theoreticalArrival = Atomic<UInt64>(0)

    /// `bytesPerSecond` 0: unlimited.
    public init(bytesPerSecond: UInt64, burstNanoseconds: UInt64 = 100_000_000) {
        rate = Atomic(bytesPerSecond)
        self.burstNanoseconds = burstNanoseconds
    }

    public var bytesPerSecond: UInt64 {
        get { rate.load(ordering: .relaxed) }
        set { rate.store(newValue, ordering: .relaxed) }
    }

    public var isLimiting: Bool { bytesPerSecond != 0 }

    /// Charges `bytes` read at `now` (monotonic ns). Returns 0 to carry on, or the
    /// nanoseconds to wait before the next read.
    @inline(__always)
    public func charge(_ bytes: Int, now: UInt64) -> UInt64 {
        let bytesPerSecond = rate.load(ordering: .relaxed)
        guard bytesPerSecond != 0 else { return 0 }
        let cost = UInt64(bytes) &* 1_000_000_000 / bytesPerSecond
        var old = theoreticalArrival.load(ordering: .relaxed)
        while true {
            let next = max(old, now) &+ cost
            let (exchanged, original) = theoreticalArrival.compareExchange(
                expected: old, desired: next, ordering: .relaxed)
            if exchanged {
                let allowed = now &+ burstNanoseconds
                return next > allowed ? next - allowed : 0
            }
            old = original
        }
    }
}
