import Glibc
import Yams

/// The users file: who may authenticate and what each may use.
///
/// ```yaml
/// users:
///   - name: alice
///     password_hash: "$argon2id$v=19$m=65536,t=2,p=1$…"   # from `igris passwd`
///     max_connections: 64          # optional
///     upload_rate: 10MB            # optional, bytes/s: 1000000, 500KiB, 8Mbit
///     download_rate: 50MB          # optional
///     expires: 2027-06-30          # optional, UTC date or date-time (…T12:00:00Z)
/// ```
public final class UserDirectory: Sendable {
    /// Append-only across reloads: open connections name their account by index, so a
    /// removed account stays (marked removed) and a new one is appended.
    public let accounts: [UserAccount]
    private let byName: [String: Int]

    public init(accounts: [UserAccount]) {
        self.accounts = accounts
        var byName: [String: Int] = [:]
        for (i, a) in accounts.enumerated() { byName[a.name] = i }
        self.byName = byName
    }

    /// The account that may authenticate under `name` (not a removed one).
    public func index(of name: String) -> Int? {
        guard let i = byName[name], !accounts[i].isRemoved else { return nil }
        return i
    }

    /// What a reload changed, by name.
    public struct Changes: Sendable, Equatable {
        public var added: [String] = []
        public var removed: [String] = []
        /// Kept accounts whose password hash changed.
        public var newPassword: [String] = []
        public var isEmpty: Bool { added.isEmpty && removed.isEmpty && newPassword.isEmpty }
    }

    /// This directory updated to `file`'s users: kept accounts (the same objects, with their
    /// live counters) take the new settings, missing ones are marked removed, new ones are
    /// appended. Indices of the old directory stay valid in the new one.
    public func reloaded(from file: UserDirectory) -> (directory: UserDirectory, changes: Changes) {
        var accounts = self.accounts
        var changes = Changes()
        var named = Set<String>()
        for incoming in file.accounts {
            named.insert(incoming.name)
            if let i = byName[incoming.name] {
                let wasRemoved = accounts[i].isRemoved
                if accounts[i].adopt(incoming) && !wasRemoved { changes.newPassword.append(incoming.name) }
                if wasRemoved { changes.added.append(incoming.name) }
            } else {
                accounts.append(incoming)
                changes.added.append(incoming.name)
            }
        }
        for a in accounts where !named.contains(a.name) && !a.isRemoved {
            a.markRemoved()
            changes.removed.append(a.name)
        }
        return (UserDirectory(accounts: accounts), changes)
    }

    /// Reads and validates a users file.
    public static func load(path: String) throws(YAMLFileError) -> UserDirectory {
        // Whoever can write the users file can make themselves a user: only its owner may.
        var info = stat()
        if stat(path, &info) == 0 && info.st_mode & (S_IWGRP | S_IWOTH) != 0 {
            let mode = String(info.st_mode & 0o777, radix: 8)
            throw YAMLFileError(file: path, keyPath: "", line: nil,
                                message: "is writable by its group or by others (mode \(mode)): anyone who can write it can add a user; chmod go-w it")
        }
        guard let text = readFile(path) else {
            throw YAMLFileError(file: path, keyPath: "", line: nil, message: "cannot read: \(String(cString: strerror(errno)))")
        }
        return try parse(text, file: path)
    }

    public static func parse(_ text: String, file: String) throws(YAMLFileError) -> UserDirectory {
        let parsed = try StrictYAML.decode(UsersFile.self, from: text, file: file)
        var seen: Set<String> = []
        for (i, u) in parsed.users.enumerated() {
            if !seen.insert(u.name).inserted {
                throw YAMLFileError(file: file, keyPath: "users[\(i)].name", line: nil, message: "duplicate user '\(u.name)'")
            }
        }
        return UserDirectory(accounts: parsed.users.map {
            UserAccount(name: $0.name, passwordHash: $0.passwordHash, maxConnections: $0.maxConnections, expiresAt: $0.expires,
                        uploadBytesPerSecond: $0.uploadRate, downloadBytesPerSecond: $0.downloadRate)
        })
    }

    /// A whole (configuration-sized, ≤ 64 MiB) file as text.
    public static func readFile(_ path: String) -> String? {
        guard let f = fopen(path, "rb") else { return nil }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n <= 0 { break }
            bytes += chunk[0..<n]
            if bytes.count > 64 << 20 { return nil }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

struct UsersFile: Decodable {
    var users: [UserEntry]

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["users"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        users = try c.decodeIfPresent([UserEntry].self, forKey: AnyCodingKey(stringValue: "users")) ?? []
    }
}

struct UserEntry: Decodable {
    var name: String
    var passwordHash: String
    var maxConnections: Int?
    var uploadRate: UInt64?
    var downloadRate: UInt64?
    var expires: Int64?

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["name", "password_hash", "max_connections", "upload_rate", "download_rate", "expires"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        func key(_ s: String) -> AnyCodingKey { AnyCodingKey(stringValue: s) }
        name = try c.decode(String.self, forKey: key("name"))
        guard !name.isEmpty, name.utf8.count <= 255 else {
            throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key("name")], debugDescription: "a name is 1 to 255 bytes (RFC 1929)"))
        }
        passwordHash = try c.decode(String.self, forKey: key("password_hash"))
        guard PasswordHasher.isValidHash(passwordHash) else {
            throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key("password_hash")],
                                                    debugDescription: "not an argon2id hash (make one with `igris passwd`)"))
        }
        maxConnections = try c.decodeIfPresent(Int.self, forKey: key("max_connections"))
        if let m = maxConnections, m < 1 {
            throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key("max_connections")], debugDescription: "must be at least 1"))
        }
        uploadRate = try Self.rate(c, key("upload_rate"))
        downloadRate = try Self.rate(c, key("download_rate"))
        if let text = try c.decodeIfPresent(String.self, forKey: key("expires")) {
            guard let t = Self.parseDate(text) else {
                throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key("expires")],
                                                        debugDescription: "expected YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC), got '\(text)'"))
            }
            expires = t
        }
    }

    static func rate(_ c: KeyedDecodingContainer<AnyCodingKey>, _ key: AnyCodingKey) throws -> UInt64? {
        guard let text = try c.decodeIfPresent(String.self, forKey: key) else { return nil }
        guard let v = ByteRate.parse(text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key],
                                                    debugDescription: "expected bytes per second such as 1000000, 500KB, 10MiB or 8Mbit, got '\(text)'"))
        }
        return v
    }

    /// UTC `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SSZ` → seconds since the epoch.
    static func parseDate(_ text: String) -> Int64? {
        let u = Array(text.utf8)
        func number(_ from: Int, _ count: Int) -> Int32? {
            guard from + count <= u.count else { return nil }
            var v: Int32 = 0
            for c in u[from..<from + count] {
                guard c >= 48 && c <= 57 else { return nil }
                v = v * 10 + Int32(c - 48)
            }
            return v
        }
        guard u.count == 10 || (u.count == 20 && (u[10] == UInt8(ascii: "T") || u[10] == UInt8(ascii: " ")) && u[19] == UInt8(ascii: "Z")),
              u[4] == UInt8(ascii: "-"), u[7] == UInt8(ascii: "-"),
              let year = number(0, 4), let month = number(5, 2), let day = number(8, 2),
              (1...12).contains(month), (1...31).contains(day) else { return nil }
        var t = tm()
        t.tm_year = year - 1900
        t.tm_mon = month - 1
        t.tm_mday = day
        if u.count == 20 {
            guard u[13] == UInt8(ascii: ":"), u[16] == UInt8(ascii: ":"),
                  let h = number(11, 2), let m = number(14, 2), let s = number(17, 2), h < 24, m < 60, s < 61 else { return nil }
            t.tm_hour = h
            t.tm_min = m
            t.tm_sec = s
        }
        return Int64(timegm(&t))
    }
}

/// Bytes per second from operator text.
public enum ByteRate {
    public static func parse(_ text: String) -> UInt64? {
        var s = Substring(text.trimmingCharacters())
        if s.hasSuffix("/s") { s = s.dropLast(2) }
        let digits = s.prefix { $0.isASCII && ($0.isNumber || $0 == ".") }
        guard !digits.isEmpty, let value = Double(digits), value > 0 else { return nil }
        let unit = s.dropFirst(digits.count).trimmingCharacters()
        let multiplier: Double
        switch unit {
        case "", "B": multiplier = 1
        case "KB", "kB": multiplier = 1e3
        case "MB": multiplier = 1e6
        case "GB": multiplier = 1e9
        case "KiB": multiplier = 1024
        case "MiB": multiplier = 1_048_576
        case "GiB": multiplier = 1_073_741_824
        case "kbit", "Kbit": multiplier = 125
        case "Mbit": multiplier = 125_000
        case "Gbit": multiplier = 125_000_000
        default: return nil
        }
        let bytes = value * multiplier
        guard bytes >= 1, bytes < 1e15 else { return nil }
        return UInt64(bytes)
    }
}

/// A byte count from operator text: 1048576, 64KiB, 256MiB, 1GB.
public enum ByteSize {
    public static func parse(_ text: String) -> UInt64? {
        guard !text.hasSuffix("/s"), !text.hasSuffix("bit") else { return nil }
        return ByteRate.parse(text)
    }
}

extension StringProtocol {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}
