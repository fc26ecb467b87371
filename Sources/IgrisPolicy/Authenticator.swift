import CSodium
import Glibc
import Synchronization

/// Checks usernames and passwords against a `UserDirectory`. Blocking (argon2id): runs on
/// the offload pool, never on a worker.
///
/// - A success is remembered for `successTTL` as a keyed BLAKE2b tag of the password (the
///   password itself is never kept or logged), so a client's reconnect storm costs one KDF.
/// - Failures are counted per source address; past `failureLimit` within `failureWindow`
///   that address is refused without running the KDF until the window ends, so a
///   password-guessing client cannot burn the CPU.
public final class Authenticator: Sendable {
    public enum Outcome: Equatable, Sendable {
        /// Index into `directory.accounts`.
        case accepted(Int)
        case rejected(Rejection)
    }

    public enum Rejection: String, Sendable {
        case unknownUser = "unknown user"
        case wrongPassword = "wrong password"
        case expired = "account expired"
        case rateLimited = "too many failures from this address"
    }

    public let directory: UserDirectory
    public let successTTLNanoseconds: UInt64
    public let failureLimit: Int
    public let failureWindowNanoseconds: UInt64

    private struct CachedSuccess {
        var tag: [UInt8]
        var expires: UInt64
    }

    private struct FailureWindow {
        var count: Int
        var started: UInt64
    }

    private let cacheKey: [UInt8]
    private let successes = Locked<[String: CachedSuccess]>([:])
    private let failures = Locked<[IPAddress: FailureWindow]>([:])
    private let counters = Counters()
    /// A real hash to verify against for unknown users, so the answer takes as long as for a
    /// known user with a wrong password.
    private let decoyHash: String

    final class Counters: Sendable {
        let accepted = Atomic<Int64>(0)
        let rejected = Atomic<Int64>(0)
        let rateLimited = Atomic<Int64>(0)
        let cacheHits = Atomic<Int64>(0)
        let kdfRuns = Atomic<Int64>(0)
    }

    public init(directory: UserDirectory, successTTLNanoseconds: UInt64 = 60_000_000_000,
                failureLimit: Int = 10, failureWindowNanoseconds: UInt64 = 60_000_000_000) throws(PasswordHasher.Failure) {
        try PasswordHasher.initialise()
        self.directory = directory
        self.successTTLNanoseconds = successTTLNanoseconds
        self.failureLimit = failureLimit
        self.failureWindowNanoseconds = failureWindowNanoseconds
        var key = [UInt8](repeating: 0, count: Int(crypto_generichash_KEYBYTES))
        randombytes_buf(&key, key.count)
        cacheKey = key
        decoyHash = (try? PasswordHasher.hash(key)) ?? ""
    }

    /// `now` is the monotonic clock in ns.
    public func verify(username: [UInt8], password: [UInt8], client: IPAddress, now: UInt64) -> Outcome {
        if isRateLimited(client, now: now) {
            counters.rateLimited.wrappingAdd(1, ordering: .relaxed)
            return .rejected(.rateLimited)
        }
        let name = String(decoding: username, as: UTF8.self)
        guard let index = directory.index(of: name), Array(name.utf8) == username else {
            counters.kdfRuns.wrappingAdd(1, ordering: .relaxed)
            _ = PasswordHasher.verify(password, against: decoyHash)
            return reject(.unknownUser, client: client, now: now)
        }
        let account = directory.accounts[index]
        var wallClock = timespec()
        clock_gettime(CLOCK_REALTIME, &wallClock)
        if account.isExpired(atEpochSeconds: Int64(wallClock.tv_sec)) {
            // As slow as a wrong password: the answer's timing must not tell which names exist.
            counters.kdfRuns.wrappingAdd(1, ordering: .relaxed)
            _ = PasswordHasher.verify(password, against: account.passwordHash)
            return reject(.expired, client: client, now: now)
        }
        let tag = self.tag(password)
        let cached = successes.withLock { cache -> Bool in
            guard let hit = cache[name] else { return false }
            if hit.expires <= now { cache[name] = nil; return false }
            return hit.tag == tag
        }
        if cached {
            counters.cacheHits.wrappingAdd(1, ordering: .relaxed)
            counters.accepted.wrappingAdd(1, ordering: .relaxed)
            return .accepted(index)
        }
        counters.kdfRuns.wrappingAdd(1, ordering: .relaxed)
        guard PasswordHasher.verify(password, against: account.passwordHash) else {
            return reject(.wrongPassword, client: client, now: now)
        }
        successes.withLock { cache in
            if cache.count > 100_000 { cache.removeAll() }
            cache[name] = CachedSuccess(tag: tag, expires: now + successTTLNanoseconds)
        }
        counters.accepted.wrappingAdd(1, ordering: .relaxed)
        return .accepted(index)
    }

    private func tag(_ password: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        crypto_generichash(&out, out.count, password, UInt64(password.count), cacheKey, cacheKey.count)
        return out
    }

    private func isRateLimited(_ client: IPAddress, now: UInt64) -> Bool {
        failures.withLock { map in
            guard let w = map[client] else { return false }
            if now &- w.started >= failureWindowNanoseconds { map[client] = nil; return false }
            return w.count >= failureLimit
        }
    }

    private func reject(_ why: Rejection, client: IPAddress, now: UInt64) -> Outcome {
        counters.rejected.wrappingAdd(1, ordering: .relaxed)
        failures.withLock { map in
            if map.count > 65536 {
                // Bounded: forget windows that are over; if every one is live, start afresh.
                map = map.filter { now &- $0.value.started < failureWindowNanoseconds }
                if map.count > 65536 { map.removeAll() }
            }
            if var w = map[client], now &- w.started < failureWindowNanoseconds {
                w.count += 1
                map[client] = w
            } else {
                map[client] = FailureWindow(count: 1, started: now)
            }
        }
        return .rejected(why)
    }

    public var acceptedCount: Int64 { counters.accepted.load(ordering: .relaxed) }
    public var rejectedCount: Int64 { counters.rejected.load(ordering: .relaxed) }
    public var rateLimitedCount: Int64 { counters.rateLimited.load(ordering: .relaxed) }
    public var cacheHitCount: Int64 { counters.cacheHits.load(ordering: .relaxed) }
    public var kdfRunCount: Int64 { counters.kdfRuns.load(ordering: .relaxed) }
}
