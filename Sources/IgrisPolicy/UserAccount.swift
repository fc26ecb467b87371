import Synchronization

/// One user of the users file, with the live counters every worker shares.
public final class UserAccount: Sendable {
    public let name: String
    /// libsodium `crypto_pwhash_str` output (`$argon2id$…`).
    public let passwordHash: String
    public let maxConnections: Int?
    /// Seconds since the epoch (UTC); the account stops authenticating from then on.
    public let expiresAt: Int64?
    /// client → destination.
    public let upload: RateLimiter?
    /// destination → client.
    public let download: RateLimiter?

    private let connections = Atomic<Int>(0)
    private let connectionsTotalCell = Atomic<Int64>(0)
    private let bytesUp = Atomic<Int64>(0)
    private let bytesDown = Atomic<Int64>(0)

    public init(name: String, passwordHash: String, maxConnections: Int? = nil, expiresAt: Int64? = nil,
                uploadBytesPerSecond: UInt64? = nil, downloadBytesPerSecond: UInt64? = nil) {
        self.name = name
        self.passwordHash = passwordHash
        self.maxConnections = maxConnections
        self.expiresAt = expiresAt
        upload = uploadBytesPerSecond.map { RateLimiter(bytesPerSecond: $0) }
        download = downloadBytesPerSecond.map { RateLimiter(bytesPerSecond: $0) }
    }

    public var isRateLimited: Bool { upload != nil || download != nil }

    public func isExpired(atEpochSeconds now: Int64) -> Bool {
        guard let expiresAt else { return false }
        return now >= expiresAt
    }

    /// Takes one of the user's connection slots; false at `maxConnections`.
    public func tryAcquireConnection() -> Bool {
        let n = connections.wrappingAdd(1, ordering: .relaxed).newValue
        if let maxConnections, n > maxConnections {
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
