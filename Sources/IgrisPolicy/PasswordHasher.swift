import CSodium

/// argon2id through libsodium. Hashing and verifying take tens of milliseconds and tens of
/// MiB on purpose: call them off the worker threads.
public enum PasswordHasher {
    public enum Failure: Error, CustomStringConvertible {
        case sodiumUnavailable
        case hashingFailed

        public var description: String {
            switch self {
            case .sodiumUnavailable: return "libsodium failed to initialise"
            case .hashingFailed: return "argon2id hashing failed (out of memory?)"
            }
        }
    }

    /// Idempotent; safe from any thread.
    public static func initialise() throws(Failure) {
        if sodium_init() < 0 { throw .sodiumUnavailable }
    }

    /// An encoded `$argon2id$v=19$m=…,t=…,p=…$salt$hash` string with libsodium's interactive
    /// limits (the ones meant for online logins).
    public static func hash(_ password: [UInt8]) throws(Failure) -> String {
        try initialise()
        var out = [CChar](repeating: 0, count: Int(crypto_pwhash_STRBYTES))
        // One spare byte so an empty password still has an address.
        let bytes = password.map { CChar(bitPattern: $0) } + [0]
        let rc = crypto_pwhash_str_alg(&out, bytes, UInt64(password.count),
                                       UInt64(crypto_pwhash_opslimit_interactive()), crypto_pwhash_memlimit_interactive(),
                                       crypto_pwhash_alg_argon2id13())
        if rc != 0 { throw .hashingFailed }
        return out.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    /// Whether `password` matches `hash`; false for a malformed hash too.
    public static func verify(_ password: [UInt8], against hash: String) -> Bool {
        guard (try? initialise()) != nil, hash.hasPrefix("$argon2id$") else { return false }
        let bytes = password.map { CChar(bitPattern: $0) } + [0]
        return crypto_pwhash_str_verify(hash, bytes, UInt64(password.count)) == 0
    }

    /// Whether `text` is a hash this build can verify.
    public static func isValidHash(_ text: String) -> Bool {
        text.hasPrefix("$argon2id$v=19$") && text.utf8.count < Int(crypto_pwhash_STRBYTES)
    }
}
