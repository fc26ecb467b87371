import CSodium
import Glibc
import Synchronization

/// Checks usernames and passwords against a `UserDirectory`, in two steps:
///
/// - `precheck` runs on the worker and never blocks: it refuses a locked-out source or user
///   name, and answers a cached success at once (no queue, no KDF).
/// - `verifyWithKDF` (argon2id) runs on the password-check threads, never on a worker.
///
/// A success is remembered for `successTTL` as a keyed BLAKE2b tag of the password (the
/// password itself is never kept or logged), so a client's reconnect storm costs one KDF.
/// Failures count per source (an IPv4 address, an IPv6 /64) and per user name: past
/// `failureLimit` in `failureWindow` a source is refused without running the KDF, and past
/// `nameFailureLimit` so is a name (except to a client whose password matches its cached
/// success), so neither many guesses from one place nor a few from many places burn the CPU.
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
        case nameRateLimited = "too many failures for this user name"
        /// The password-check queue had no room: nothing was checked.
        case busy = "password checks busy"
    }

    public let successTTLNanoseconds: UInt64
    public let sources: FailureLimiter<IPAddress>
    public let names: FailureLimiter<String>

    private struct CachedSuccess {
        var tag: [UInt8]
        var expires: UInt64
    }

    private let current: Locked<UserDirectory>
    private let cacheKey: [UInt8]
    private let successes = Locked<[String: CachedSuccess]>([:])
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
                failureLimit: Int = 10, nameFailureLimit: Int = 100, failureWindowNanoseconds: UInt64 = 60_000_000_000) throws(PasswordHasher.Failure) {
        try PasswordHasher.initialise()
        current = Locked(directory)
        self.successTTLNanoseconds = successTTLNanoseconds
        sources = FailureLimiter(limit: failureLimit, windowNanoseconds: failureWindowNanoseconds)
        names = FailureLimiter(limit: nameFailureLimit, windowNanoseconds: failureWindowNanoseconds)
        var key = [UInt8](repeating: 0, count: Int(crypto_generichash_KEYBYTES))
        randombytes_buf(&key, key.count)
        cacheKey = key
        decoyHash = (try? PasswordHasher.hash(key)) ?? ""
    }

    /// The users as of the last reload.
    public var directory: UserDirectory { current.withLock { $0 } }

    /// SIGHUP: the users file again. Kept users keep their account (and open tunnels); the
    /// cached successes of removed users and of changed passwords are forgotten.
    @discardableResult
    public func reload(_ file: UserDirectory) -> (directory: UserDirectory, changes: UserDirectory.Changes) {
        let result = current.withLock { d in
            let r = d.reloaded(from: file)
            d = r.directory
            return r
        }
        let forget = result.changes.removed + result.changes.newPassword
        if !forget.isEmpty { successes.withLock { cache in for n in forget { cache[n] = nil } } }
        return result
    }

    /// Both steps at once (tests, `igris check`).
    public func verify(username: [UInt8], password: [UInt8], client: IPAddress, now: UInt64) -> Outcome {
        precheck(username: username, password: password, client: client, now: now)
            ?? verifyWithKDF(username: username, password: password, client: client, now: now)
    }

    /// The answer when it needs no KDF (a lockout, a cached success); nil: queue
    /// `verifyWithKDF`. Cheap enough for a worker: two table lookups and a BLAKE2b.
    public func precheck(username: [UInt8], password: [UInt8], client: IPAddress, now: UInt64) -> Outcome? {
        if let locked = lockout(username: username, client: client, now: now, cachedFirst: true, password: password) { return locked }
        return nil
    }

    /// argon2id. `now` is the monotonic clock in ns.
    public func verifyWithKDF(username: [UInt8], password: [UInt8], client: IPAddress, now: UInt64) -> Outcome {
        // Failures may have piled up while this waited in the queue.
        if let locked = lockout(username: username, client: client, now: now, cachedFirst: false, password: password) { return locked }
        let name = String(decoding: username, as: UTF8.self)
        let directory = self.directory
        guard let index = directory.index(of: name), Array(name.utf8) == username else {
            counters.kdfRuns.wrappingAdd(1, ordering: .relaxed)
            _ = PasswordHasher.verify(password, against: decoyHash)
            return reject(.unknownUser, name: name, client: client, now: now)
        }
        let account = directory.accounts[index]
        counters.kdfRuns.wrappingAdd(1, ordering: .relaxed)
        let matches = PasswordHasher.verify(password, against: account.passwordHash)
        // Expired: as slow as a wrong password, so the timing doesn't tell which names exist.
        if account.isExpired(atEpochSeconds: Self.epochSeconds()) { return reject(.expired, name: name, client: client, now: now) }
        guard matches else { return reject(.wrongPassword, name: name, client: client, now: now) }
        let tag = self.tag(password)
        successes.withLock { cache in
            if cache.count >= 100_000 { cache = cache.filter { $0.value.expires > now } }
            if cache.count < 100_000 { cache[name] = CachedSuccess(tag: tag, expires: now + successTTLNanoseconds) }
        }
        counters.accepted.wrappingAdd(1, ordering: .relaxed)
        return .accepted(index)
    }

    /// A source's lockout first (a cached tag must not become a cheap way to test guesses);
    /// then, before the KDF is queued, a cached success; then the name's lockout.
    private func lockout(username: [UInt8], client: IPAddress, now: UInt64, cachedFirst: Bool, password: [UInt8]) -> Outcome? {
        if sources.isLimited(client.failureKey, now: now) {
            counters.rateLimited.wrappingAdd(1, ordering: .relaxed)
            return .rejected(.rateLimited)
        }
        let name = String(decoding: username, as: UTF8.self)
        if cachedFirst, let index = cachedSuccess(name: name, username: username, password: password, now: now) {
            counters.cacheHits.wrappingAdd(1, ordering: .relaxed)
            counters.accepted.wrappingAdd(1, ordering: .relaxed)
            return .accepted(index)
        }
        if names.isLimited(name, now: now) {
            counters.rateLimited.wrappingAdd(1, ordering: .relaxed)
            return .rejected(.nameRateLimited)
        }
        return nil
    }

    private func cachedSuccess(name: String, username: [UInt8], password: [UInt8], now: UInt64) -> Int? {
        let directory = self.directory
        guard let index = directory.index(of: name), Array(name.utf8) == username,
              !directory.accounts[index].isExpired(atEpochSeconds: Self.epochSeconds()) else { return nil }
        let tag = self.tag(password)
        let hit = successes.withLock { cache -> Bool in
            guard let hit = cache[name] else { return false }
            if hit.expires <= now { cache[name] = nil; return false }
            return hit.tag == tag
        }
        return hit ? index : nil
    }

    static func epochSeconds() -> Int64 {
        var wallClock = timespec()
        clock_gettime(CLOCK_REALTIME, &wallClock)
        return Int64(wallClock.tv_sec)
    }

    private func tag(_ password: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        crypto_generichash(&out, out.count, password, UInt64(password.count), cacheKey, cacheKey.count)
        return out
    }

    private func reject(_ why: Rejection, name: String, client: IPAddress, now: UInt64) -> Outcome {
        counters.rejected.wrappingAdd(1, ordering: .relaxed)
        sources.recordFailure(client.failureKey, now: now)
        names.recordFailure(name, now: now)
        return .rejected(why)
    }

    public var acceptedCount: Int64 { counters.accepted.load(ordering: .relaxed) }
    public var rejectedCount: Int64 { counters.rejected.load(ordering: .relaxed) }
    public var rateLimitedCount: Int64 { counters.rateLimited.load(ordering: .relaxed) }
    public var cacheHitCount: Int64 { counters.cacheHits.load(ordering: .relaxed) }
    public var kdfRunCount: Int64 { counters.kdfRuns.load(ordering: .relaxed) }
}
