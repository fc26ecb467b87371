import Synchronization

/// One user of the users file, with the live counters every worker shares.
public final class UserAccount: Sendable {
    public let name: String
    /// client → destination (unlimited: rate 0).
    public let upload: RateLimiter
    /// destination → client.
    public let download: RateLimiter

    // The settings a users-file reload may change (`adopt`), read by workers and the
    // password checkers while it happens.
    private let hash: Locked<String>
    /// 0: no limit.
    private let maxConnectionsCell: Atomic<Int>
    /// Int64.max: never.
    private let expiresAtCell: Atomic<Int64>
    private let removedCell = Atomic<Bool>(false)

    private let connections = Atomic<Int>(0)
    private let connectionsTotalCell = Atomic<Int64>(0)
    private let bytesUp = Atomic<Int64>(0)
    private let bytesDown = Atomic<Int64>(0)

    public init(name: String, passwordHash: String, maxConnections: Int? = nil, expiresAt: Int64? = nil,
                uploadBytesPerSecond: UInt64? = nil, downloadBytesPerSecond: UInt64? = nil) {
        self.name = name
        hash = Locked(passwordHash)
        maxConnectionsCell = Atomic(maxConnections ?? 0)
        expiresAtCell = Atomic(expiresAt ?? .max)
        upload = RateLimiter(bytesPerSecond: uploadBytesPerSecond ?? 0)
        download = RateLimiter(bytesPerSecond: downloadBytesPerSecond ?? 0)
    }

    /// libsodium `crypto_pwhash_str` output (`$argon2id$…`).
    public var passwordHash: String { hash.withLock { $0 } }
    public var maxConnections: Int? {
        let m = maxConnectionsCell.load(ordering: .relaxed)
        return m == 0 ? nil : m
    }
    /// Seconds since the epoch (UTC); the account stops authenticating, and its open
    /// tunnels end, from then on.
    public var expiresAt: Int64? {
        let e = expiresAtCell.load(ordering: .relaxed)
        return e == .max ? nil : e
    }
    /// No longer in the users file: refused, and its tunnels closed.
    public var isRemoved: Bool { removedCell.load(ordering: .relaxed) }

    public var isRateLimited: Bool { upload.isLimiting || download.isLimiting }

    public func isExpired(atEpochSeconds now: Int64) -> Bool { now >= expiresAtCell.load(ordering: .relaxed) }

    /// Removed from the users file or expired: its open tunnels must end.
    public func isRevoked(atEpochSeconds now: Int64) -> Bool { isRemoved || isExpired(atEpochSeconds: now) }

    /// A users-file reload: takes `other`'s settings (this object, with its live counters,
    /// stays the one workers and open tunnels refer to). True when the password changed.
    @discardableResult
    public func adopt(_ other: UserAccount) -> Bool {
        let changed = hash.withLock { h -> Bool in
            let new = other.passwordHash
            defer { h = new }
            return h != new
        }
        maxConnectionsCell.store(other.maxConnectionsCell.load(ordering: .relaxed), ordering: .relaxed)
        expiresAtCell.store(other.expiresAtCell.load(ordering: .relaxed), ordering: .relaxed)
        upload.bytesPerSecond = other.upload.bytesPerSecond
        download.bytesPerSecond = other.download.bytesPerSecond
        removedCell.store(false, ordering: .relaxed)
        return changed
    }

    /// A reload's users file no longer names this account.
    public func markRemoved() { removedCell.store(true, ordering: .relaxed) }

    /// Takes one of the user's connection slots; false at `maxConnections`.
    public func tryAcquireConnection() -> Bool {
        let n = connections.wrappingAdd(1, ordering: .relaxed).newValue
        let limit = maxConnectionsCell.load(ordering: .relaxed)
        if limit != 0, n > limit {
            connections.wrappingSubtract(1, ordering: .relaxed)
            return false
        }
        connectionsTotalCell.wrappingAdd(1, ordering: .relaxed)
        return true
    }

    public func releaseConnection() { connections.wrappingSubtract(1, ordering: .relaxed) }

    @inline(__always)
    public func addBytes(toDestination n: Int) { bytesUp.wrappingAdd(Int64(n), ordering: .relaxed) }

    @inline(__always)
    public func addBytes(toClient n: Int) { bytesDown.wrappingAdd(Int64(n), ordering: .relaxed) }

    public var activeConnections: Int { connections.load(ordering: .relaxed) }
    public var connectionsTotal: Int64 { connectionsTotalCell.load(ordering: .relaxed) }
    public var bytesToDestination: Int64 { bytesUp.load(ordering: .relaxed) }
    public var bytesToClient: Int64 { bytesDown.load(ordering: .relaxed) }
}
