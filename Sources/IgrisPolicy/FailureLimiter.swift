/// Counts authentication failures per key (a source prefix, a user name) in fixed windows:
/// past `limit` failures within `window` the key is refused until its window ends.
///
/// Bounded: at `capacity` keys, windows that are over are forgotten first, then the oldest
/// live one — one at a time, so a flood of new keys never resets everyone's lockout.
public final class FailureLimiter<Key: Hashable & Sendable>: Sendable {
    private struct Window {
        var count: Int
        var started: UInt64
    }

    public let limit: Int
    public let windowNanoseconds: UInt64
    public let capacity: Int
    private let windows: Locked<[Key: Window]>

    public init(limit: Int, windowNanoseconds: UInt64, capacity: Int = 65_536) {
        self.limit = limit
        self.windowNanoseconds = windowNanoseconds
        self.capacity = max(1, capacity)
        windows = Locked([:])
    }

    /// `now` is the monotonic clock in ns.
    public func isLimited(_ key: Key, now: UInt64) -> Bool {
        windows.withLock { map in
            guard let w = map[key] else { return false }
            if now &- w.started >= windowNanoseconds { map[key] = nil; return false }
            return w.count >= limit
        }
    }

    public func recordFailure(_ key: Key, now: UInt64) {
        windows.withLock { map in
            if var w = map[key], now &- w.started < windowNanoseconds {
                w.count += 1
                map[key] = w
                return
            }
            if map[key] == nil && map.count >= capacity { makeRoom(&map, now: now) }
            map[key] = Window(count: 1, started: now)
        }
    }

    /// Keys being tracked (tests, metrics).
    public var count: Int { windows.withLock { $0.count } }

    private func makeRoom(_ map: inout [Key: Window], now: UInt64) {
        let window = windowNanoseconds
        map = map.filter { now &- $0.value.started < window }
        guard map.count >= capacity else { return }
        // All live: the one whose window ends first goes, and only that one.
        if let oldest = map.min(by: { $0.value.started < $1.value.started })?.key { map[oldest] = nil }
    }
}

extension IPAddress {
    /// Whom a failure is counted against: an IPv4 address, or an IPv6 address's /64 (one
    /// host usually has a whole /64, and can pick any address in it).
    public var failureKey: IPAddress { isIPv4Mapped ? self : IPAddress(high: high, low: 0) }
}
