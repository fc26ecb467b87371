import Glibc
/// A hashed timer wheel over connection slots: one pending deadline per slot, linked
/// through the slot table (no allocation, no kernel timer per connection).
///
/// `tickNanoseconds` granularity; `bucketCount` buckets per revolution. A deadline further
/// than one revolution sits in its bucket until its round comes (the deadline is checked
/// when the bucket is visited). The worker's wait timeout is the time to the next tick that
/// has a timer in it, so a worker with no timers sleeps until I/O arrives.
/// (`@_spi(Benchmarks)`: public only to the microbenchmarks.)
@_spi(Benchmarks) public struct TimerWheel {
    static let none: Int32 = -1
    let tickNanoseconds: UInt64
    let bucketCount: Int
    private var heads: [Int32]
    public private(set) var scheduled = 0
    /// The tick every bucket up to which has been processed.
    private var currentTick: UInt64
    /// No bucket of the ticks after `currentTick` and before this one holds a timer: the
    /// search for the next timer starts here instead of walking the empty buckets each turn.
    private var searchFrom: UInt64

    public init(now: UInt64, tickNanoseconds: UInt64 = 10_000_000, bucketCount: Int = 1024) {
        self.tickNanoseconds = tickNanoseconds
        self.bucketCount = bucketCount
        heads = Array(repeating: Self.none, count: bucketCount)
        currentTick = now / tickNanoseconds
        searchFrom = currentTick + 1
    }

    /// Links `slot` (whose `timerDeadline` is already set) into its bucket.
    public mutating func schedule(_ slot: Int32, deadline: UInt64, table: ConnectionTable) {
        // Round up: the loop wakes at the start of the tick, which must not precede the
        // deadline, or the timer would wait a whole revolution.
        var tick = (deadline + tickNanoseconds - 1) / tickNanoseconds
        if tick <= currentTick { tick = currentTick + 1 }
        // A deadline more than a revolution away shares its bucket with an earlier tick.
        searchFrom = min(searchFrom, tick > currentTick + UInt64(bucketCount) ? currentTick + 1 : tick)
        let b = Int(tick % UInt64(bucketCount))
        let p = table.pointer(slot)
        p.pointee.timerDeadline = deadline
        p.pointee.timerPrevious = Self.none
        p.pointee.timerNext = heads[b]
        p.pointee.timerBucket = Int32(b)
        if heads[b] != Self.none { table.pointer(heads[b]).pointee.timerPrevious = slot }
        heads[b] = slot
        scheduled += 1
    }

    public mutating func cancel(_ slot: Int32, table: ConnectionTable) {
        let p = table.pointer(slot)
        let b = Int(p.pointee.timerBucket)
        guard b >= 0 else { return }
        if p.pointee.timerPrevious != Self.none {
            table.pointer(p.pointee.timerPrevious).pointee.timerNext = p.pointee.timerNext
        } else {
            heads[b] = p.pointee.timerNext
        }
        if p.pointee.timerNext != Self.none {
            table.pointer(p.pointee.timerNext).pointee.timerPrevious = p.pointee.timerPrevious
        }
        p.pointee.timerBucket = -1
        p.pointee.timerNext = Self.none
        p.pointee.timerPrevious = Self.none
        scheduled -= 1
    }

    /// Nanoseconds until the next tick holding a timer (nil: no timers at all).
    mutating func nanosecondsUntilNextTimer(now: UInt64) -> UInt64? {
        guard scheduled > 0 else { return nil }
        var tick = max(currentTick + 1, searchFrom)
        let end = currentTick + UInt64(bucketCount)
        while tick < end && heads[Int(tick % UInt64(bucketCount))] == Self.none { tick += 1 }
        searchFrom = tick
        let at = tick * tickNanoseconds
        return at > now ? at - now : 0
    }

    /// Unlinks every slot whose deadline is ≤ now and appends it to `fired` (the caller
    /// handles them afterwards, free to schedule again).
    public mutating func expire(now: UInt64, table: ConnectionTable, into fired: inout [Int32]) {
        let target = now / tickNanoseconds
        guard scheduled > 0 else { currentTick = target; return }
        // After a long sleep visit each bucket at most once.
        var tick = max(currentTick + 1, target >= UInt64(bucketCount) ? target - UInt64(bucketCount) + 1 : 0)
        while tick <= target {
            let b = Int(tick % UInt64(bucketCount))
            var s = heads[b]
            while s != Self.none {
                let next = table.pointer(s).pointee.timerNext
                if table.pointer(s).pointee.timerDeadline <= now {
                    cancel(s, table: table)
                    fired.append(s)
                }
                s = next
            }
            tick += 1
        }
        currentTick = target
    }
}
