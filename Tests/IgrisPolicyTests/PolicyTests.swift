import Testing
@testable import IgrisPolicy

@Suite("Destination ACL")
struct DestinationACLTests {
    static func ip(_ s: String) -> IPAddress { IPAddress(Substring(s))! }

    @Test("addresses parse in every form and print back")
    func parsing() {
        #expect(Self.ip("127.0.0.1") == IPAddress(ipv4: 127, 0, 0, 1))
        #expect(Self.ip("::ffff:127.0.0.1") == IPAddress(ipv4: 127, 0, 0, 1))
        #expect(Self.ip("::ffff:7f00:1") == IPAddress(ipv4: 127, 0, 0, 1))
        #expect(Self.ip("::1") == IPAddress(high: 0, low: 1))
        #expect(Self.ip("2001:db8::8:800:200c:417a") == IPAddress(high: 0x2001_0db8_0000_0000, low: 0x0000_0008_0800_200c_417a & 0xFFFF_FFFF_FFFF_FFFF))
        #expect(Self.ip("fe80::1").description == "fe80:0:0:0:0:0:0:1")
        #expect(Self.ip("10.1.2.3").description == "10.1.2.3")
        for bad in ["", "1.2.3", "1.2.3.4.5", "256.1.1.1", "1..2.3", ":::", "1::2::3", "12345::", "::g", "1:2:3:4:5:6:7:8:9", "1.2.3.04x"] {
            #expect(IPAddress(Substring(bad)) == nil, "\(bad)")
        }
        #expect(CIDR("10.0.0.0/8")!.contains(Self.ip("10.255.1.1")))
        #expect(!CIDR("10.0.0.0/8")!.contains(Self.ip("11.0.0.1")))
        #expect(CIDR("0.0.0.0/0")!.contains(Self.ip("8.8.8.8")))
        #expect(!CIDR("0.0.0.0/0")!.contains(Self.ip("2001:db8::1")))
        #expect(CIDR("::/0")!.contains(Self.ip("8.8.8.8")))
        #expect(CIDR("1.2.3.4/33") == nil)
        #expect(CIDR("::/129") == nil)
    }

    @Test("denied by default: loopback, private, link-local, CGNAT, this-host — in IPv4-mapped form too")
    func defaults() {
        let acl = DestinationACL()
        for denied in ["127.0.0.1", "127.255.0.9", "0.0.0.0", "10.0.0.1", "100.64.0.1", "169.254.169.254", "172.16.0.1",
                       "172.31.255.255", "192.168.1.1", "::1", "::", "fc00::1", "fd12::1", "fe80::1",
                       "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254"] {
            #expect(!acl.permits(Self.ip(denied), port: 80), "\(denied)")
        }
        for allowed in ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            #expect(acl.permits(Self.ip(allowed), port: 80), "\(allowed)")
        }
    }

    @Test("denied by default: special-purpose ranges, edges included; just outside them allowed")
    func specialRanges() {
        let acl = DestinationACL()
        let denied = ["192.0.0.0", "192.0.0.255", "192.0.2.1", "198.18.0.0", "198.19.255.255", "198.51.100.7", "203.0.113.255",
                      "224.0.0.1", "239.255.255.255", "240.0.0.1", "255.255.255.255", "::ffff:224.0.0.1",
                      "::", "::1", "::a00:1", "::ffff:ffff", "100::", "100::ffff:ffff:ffff:ffff", "2001:db8::1", "2001:db8:ffff::1",
                      "fec0::1", "feff::1", "ff02::1", "ffff::1"]
        for d in denied { #expect(!acl.permits(Self.ip(d), port: 443), "\(d)") }
        let allowed = ["192.0.1.255", "192.0.3.0", "198.17.255.255", "198.20.0.0", "198.51.99.255", "203.0.114.0",
                       "223.255.255.255", "100:0:0:1::", "2001:db9::1", "2001:da8::1"]
        for a in allowed { #expect(acl.permits(Self.ip(a), port: 443), "\(a)") }
    }

    @Test("an IPv6 address embedding an IPv4 one is judged by it: NAT64, 6to4, Teredo (inverted client)")
    func embeddedIPv4() {
        let acl = DestinationACL()
        // 127.0.0.1, 10.0.0.1, 192.168.1.1 and 169.254.169.254 inside each form.
        let denied = ["64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::c0a8:101", "2002:7f00:1::", "2002:a9fe:a9fe::1",
                      "2001:0:4136:e378:8000:63bf:80ff:fffe",   // Teredo client 127.0.0.1 (~0x7f000001)
                      "2001:0:4136:e378:8000:63bf:f5ff:fffe"]   // Teredo client 10.0.0.1
        for d in denied { #expect(!acl.permits(Self.ip(d), port: 443), "\(d)") }
        let allowed = ["64:ff9b::808:808", "2002:808:808::", "2001:0:4136:e378:8000:63bf:f7f7:f7f7"]  // 8.8.8.8 each way
        for a in allowed { #expect(acl.permits(Self.ip(a), port: 443), "\(a)") }
        #expect(DestinationACL.embeddedIPv4(Self.ip("2001:0:4136:e378:8000:63bf:f7f7:f7f7")) == Self.ip("8.8.8.8"))
        #expect(DestinationACL.embeddedIPv4(Self.ip("2606:4700::1111")) == nil)
        // An explicit allow still wins.
        let allowing = DestinationACL(rules: [try! DestinationACL.parseRule(.allow, "64:ff9b::/96").get()])
        #expect(allowing.permits(Self.ip("64:ff9b::7f00:1"), port: 443))
    }

    @Test("this host's own addresses are denied by default (in every form); an explicit allow wins")
    func hostAddresses() {
        let saved = HostAddresses.shared.current
        defer { HostAddresses.shared.set(saved) }
        HostAddresses.shared.set([Self.ip("8.8.4.4"), Self.ip("2606:4700::6810:1")])
        let acl = DestinationACL()
        for d in ["8.8.4.4", "::ffff:8.8.4.4", "64:ff9b::808:404", "2002:808:404::1", "2606:4700::6810:1"] {
            #expect(!acl.permits(Self.ip(d), port: 80), "\(d)")
        }
        #expect(acl.permits(Self.ip("8.8.8.8"), port: 80))
        let allowing = DestinationACL(rules: [try! DestinationACL.parseRule(.allow, "8.8.4.4/32").get()])
        #expect(allowing.permits(Self.ip("8.8.4.4"), port: 80))
        // The real interfaces: loopback at least.
        HostAddresses.shared.refresh()
        #expect(HostAddresses.shared.current.contains(Self.ip("127.0.0.1")))
    }

    @Test("operator rules come first; ports and ranges")
    func rules() throws {
        let allowLoopbackWeb = try DestinationACL.parseRule(.allow, "127.0.0.1/32:80,8000-8100").get()
        let denyDocs = try DestinationACL.parseRule(.deny, "2001:db8::/32").get()
        let allowV6Loopback = try DestinationACL.parseRule(.allow, "::1/128:22").get()
        let acl = DestinationACL(rules: [denyDocs, allowLoopbackWeb, allowV6Loopback])
        #expect(acl.permits(Self.ip("127.0.0.1"), port: 80))
        #expect(acl.permits(Self.ip("127.0.0.1"), port: 8050))
        #expect(acl.permits(Self.ip("::ffff:127.0.0.1"), port: 8100))
        #expect(!acl.permits(Self.ip("127.0.0.1"), port: 8101))
        #expect(!acl.permits(Self.ip("127.0.0.2"), port: 80))
        #expect(acl.permits(Self.ip("::1"), port: 22))
        #expect(!acl.permits(Self.ip("2001:db8::5"), port: 443))
        #expect(acl.permits(Self.ip("2001:db9::5"), port: 443))
        #expect(allowLoopbackWeb.description == "allow 127.0.0.1/32:80,8000-8100")
        for bad in ["127.0.0.1:80", "10.0.0.0/8:", "10.0.0.0/8:70000", "10.0.0.0/8:90-80", "nonsense", "10.0.0.0/40"] {
            #expect(throws: DestinationACL.RuleError.self, "\(bad)") { try DestinationACL.parseRule(.allow, bad).get() }
        }
    }
}

@Suite("Users file")
struct UserDirectoryTests {
    static let hash = try! PasswordHasher.hash(Array("secret".utf8))

    @Test("entries with limits, rates and expiry parse")
    func parses() throws {
        let text = """
            users:
              - name: alice
                password_hash: "\(Self.hash)"
                max_connections: 3
                upload_rate: 2MB
                download_rate: 8Mbit
                expires: 2030-01-02
              - name: bob
                password_hash: '\(Self.hash)'
                upload_rate: 1000000
                expires: 2030-01-02T03:04:05Z
            """
        let d = try UserDirectory.parse(text, file: "users.yaml")
        #expect(d.accounts.count == 2)
        let alice = d.accounts[d.index(of: "alice")!]
        #expect(alice.maxConnections == 3)
        #expect(alice.upload.bytesPerSecond == 2_000_000)
        #expect(alice.download.bytesPerSecond == 1_000_000)
        #expect(alice.expiresAt == 1_893_542_400)
        let bob = d.accounts[d.index(of: "bob")!]
        #expect(bob.upload.bytesPerSecond == 1_000_000 && !bob.download.isLimiting && bob.maxConnections == nil)
        #expect(bob.expiresAt == 1_893_553_445)
        #expect(ByteRate.parse("500KiB") == 512_000)
        #expect(ByteRate.parse("1.5 GB/s") == 1_500_000_000)
        #expect(ByteRate.parse("fast") == nil)
    }

    @Test("errors name the key path and line; unknown keys are errors")
    func errors() {
        func error(_ text: String) -> String {
            do {
                _ = try UserDirectory.parse(text, file: "u.yaml")
                return "no error"
            } catch {
                return error.description
            }
        }
        let unknown = error("users:\n  - name: a\n    password_hash: \"\(Self.hash)\"\n    max_conections: 3\n")
        #expect(unknown.hasPrefix("u.yaml:4: users[0].max_conections: unknown key 'max_conections'"), "\(unknown)")
        let badHash = error("users:\n  - name: a\n    password_hash: hunter2\n")
        #expect(badHash.hasPrefix("u.yaml:3: users[0].password_hash: not an argon2id hash"), "\(badHash)")
        let missing = error("users:\n  - name: a\n")
        #expect(missing.contains("users[0].password_hash: required key 'password_hash' is missing"), "\(missing)")
        let badDate = error("users:\n  - name: a\n    password_hash: \"\(Self.hash)\"\n    expires: tomorrow\n")
        #expect(badDate.hasPrefix("u.yaml:4: users[0].expires: expected YYYY-MM-DD"), "\(badDate)")
        let badRate = error("users:\n  - name: a\n    password_hash: \"\(Self.hash)\"\n    upload_rate: lots\n")
        #expect(badRate.hasPrefix("u.yaml:4: users[0].upload_rate: expected bytes per second"), "\(badRate)")
        let duplicate = error("users:\n  - name: a\n    password_hash: \"\(Self.hash)\"\n  - name: a\n    password_hash: \"\(Self.hash)\"\n")
        #expect(duplicate.contains("duplicate user 'a'"), "\(duplicate)")
        let notYAML = error("users: [\n")
        #expect(notYAML.hasPrefix("u.yaml: not valid YAML"), "\(notYAML)")
        let topLevel = error("user:\n  - name: a\n")
        #expect(topLevel.hasPrefix("u.yaml:1: user: unknown key 'user'"), "\(topLevel)")
    }
}

@Suite("Authentication")
struct AuthenticatorTests {
    static let client = IPAddress(ipv4: 192, 0, 2, 7)

    static func directory() throws -> UserDirectory {
        UserDirectory(accounts: [
            UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("secret".utf8)), maxConnections: 2),
            UserAccount(name: "old", passwordHash: try PasswordHasher.hash(Array("pw".utf8)), expiresAt: 1_000_000),
        ])
    }

    @Test("argon2id: right and wrong passwords, unknown and expired users; successes are cached")
    func verify() throws {
        let auth = try Authenticator(directory: try Self.directory())
        #expect(try PasswordHasher.hash(Array("x".utf8)).hasPrefix("$argon2id$v=19$"))
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 1) == .accepted(0))
        #expect(auth.kdfRunCount == 1)
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 2) == .accepted(0))
        #expect(auth.kdfRunCount == 1 && auth.cacheHitCount == 1)
        // The cache holds a keyed tag of the password, not "alice is fine".
        #expect(auth.verify(username: Array("alice".utf8), password: Array("Secret".utf8), client: Self.client, now: 3) == .rejected(.wrongPassword))
        // Unknown and expired names cost a KDF run like a wrong password: the time taken
        // doesn't tell an attacker which names exist.
        var runs = auth.kdfRunCount
        #expect(auth.verify(username: Array("mallory".utf8), password: Array("secret".utf8), client: Self.client, now: 4) == .rejected(.unknownUser))
        #expect(auth.kdfRunCount == runs + 1)
        runs = auth.kdfRunCount
        #expect(auth.verify(username: Array("old".utf8), password: Array("pw".utf8), client: Self.client, now: 5) == .rejected(.expired))
        #expect(auth.kdfRunCount == runs + 1)
        #expect(auth.rejectedCount == 3)
    }

    @Test("failures from one address are rate-limited without running the KDF; others are unaffected")
    func rateLimit() throws {
        let auth = try Authenticator(directory: try Self.directory(), failureLimit: 3, failureWindowNanoseconds: 1_000)
        for i in 0..<3 {
            #expect(auth.verify(username: Array("alice".utf8), password: [UInt8(i)], client: Self.client, now: 10) == .rejected(.wrongPassword))
        }
        let runs = auth.kdfRunCount
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 20) == .rejected(.rateLimited))
        #expect(auth.kdfRunCount == runs)
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: IPAddress(ipv4: 192, 0, 2, 8), now: 20) == .accepted(0))
        // The window ends: the address may try again.
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 2_000) == .accepted(0))
    }

    @Test("failures count per IPv6 /64 and per user name; a cached success still gets in")
    func sourcePrefixAndNameLimits() throws {
        let auth = try Authenticator(directory: try Self.directory(), failureLimit: 2, nameFailureLimit: 3, failureWindowNanoseconds: 1_000)
        // Two addresses of one /64 are one source.
        let a = IPAddress(Substring("2001:db8:1:2::1"))!, b = IPAddress(Substring("2001:db8:1:2:ffff::9"))!
        #expect(auth.verify(username: Array("x".utf8), password: [1], client: a, now: 10) == .rejected(.unknownUser))
        #expect(auth.verify(username: Array("y".utf8), password: [1], client: b, now: 10) == .rejected(.unknownUser))
        #expect(auth.precheck(username: Array("z".utf8), password: [1], client: b, now: 11) == .rejected(.rateLimited))
        #expect(auth.precheck(username: Array("z".utf8), password: [1], client: IPAddress(Substring("2001:db8:1:3::1"))!, now: 11) == nil)

        // alice logs in once (cached), then guesses from many sources lock her name.
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 20) == .accepted(0))
        for i in 0..<3 {
            #expect(auth.verify(username: Array("alice".utf8), password: [UInt8(i)], client: IPAddress(ipv4: 198, 51, 100, UInt8(i)), now: 20) == .rejected(.wrongPassword))
        }
        let runs = auth.kdfRunCount
        #expect(auth.precheck(username: Array("alice".utf8), password: Array("guess".utf8), client: IPAddress(ipv4: 198, 51, 100, 50), now: 21) == .rejected(.nameRateLimited))
        // Her own reconnect (the cached password) is answered at once, without the KDF.
        #expect(auth.precheck(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 21) == .accepted(0))
        #expect(auth.kdfRunCount == runs)
        // A locked-out source doesn't get to test guesses against the cache.
        #expect(auth.precheck(username: Array("alice".utf8), password: Array("secret".utf8), client: a, now: 21) == .rejected(.rateLimited))
    }

    @Test("a full failure table forgets one window at a time, oldest first, never every lockout")
    func failureTableBounded() {
        let limiter = FailureLimiter<Int>(limit: 1, windowNanoseconds: 1_000, capacity: 4)
        for k in 0..<4 { limiter.recordFailure(k, now: 100 + UInt64(k)) }
        limiter.recordFailure(99, now: 200)
        #expect(limiter.count == 4)
        #expect(!limiter.isLimited(0, now: 201), "the oldest window made room")
        for k in [1, 2, 3, 99] { #expect(limiter.isLimited(k, now: 201), "\(k) still locked out") }
        // Windows that are over go first.
        limiter.recordFailure(100, now: 1_104)
        #expect(limiter.isLimited(100, now: 1_105) && limiter.isLimited(99, now: 1_105) && limiter.count == 2)
    }

    @Test("reloading the users file: kept accounts stay the same objects, removed ones are refused, new passwords invalidate the cache")
    func reload() throws {
        let auth = try Authenticator(directory: try Self.directory())
        let alice = auth.directory.accounts[0]
        #expect(alice.tryAcquireConnection())
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 1) == .accepted(0))
        let file = UserDirectory(accounts: [
            UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("new".utf8)), maxConnections: 1, uploadBytesPerSecond: 1000),
            UserAccount(name: "carol", passwordHash: try PasswordHasher.hash(Array("c".utf8))),
        ])
        let (directory, changes) = auth.reload(file)
        #expect(changes == UserDirectory.Changes(added: ["carol"], removed: ["old"], newPassword: ["alice"]))
        #expect(directory.accounts.map(\.name) == ["alice", "old", "carol"], "append-only: indices of open connections stay valid")
        #expect(directory.accounts[0] === alice && alice.activeConnections == 1 && alice.maxConnections == 1 && alice.upload.bytesPerSecond == 1000)
        #expect(directory.accounts[1].isRevoked(atEpochSeconds: 0))
        #expect(!alice.tryAcquireConnection(), "the new max_connections counts the open one")
        // The old password's cached success is gone; the new one works.
        #expect(auth.verify(username: Array("alice".utf8), password: Array("secret".utf8), client: Self.client, now: 2) == .rejected(.wrongPassword))
        #expect(auth.verify(username: Array("alice".utf8), password: Array("new".utf8), client: Self.client, now: 3) == .accepted(0))
        #expect(auth.verify(username: Array("carol".utf8), password: Array("c".utf8), client: Self.client, now: 4) == .accepted(2))
        #expect(auth.verify(username: Array("old".utf8), password: Array("pw".utf8), client: Self.client, now: 5) == .rejected(.unknownUser))
        // Back in the file: the same account again.
        let (again, back) = auth.reload(UserDirectory(accounts: [UserAccount(name: "old", passwordHash: try PasswordHasher.hash(Array("pw".utf8)))]))
        #expect(back.added == ["old"] && again.accounts.count == 3 && !again.accounts[1].isRemoved)
    }

    @Test("per-user connection limit")
    func connectionLimit() throws {
        let alice = try Self.directory().accounts[0]
        #expect(alice.tryAcquireConnection() && alice.tryAcquireConnection())
        #expect(!alice.tryAcquireConnection())
        alice.releaseConnection()
        #expect(alice.tryAcquireConnection())
        #expect(alice.activeConnections == 2 && alice.connectionsTotal == 3)
    }
}

@Suite("Rate limiter (GCRA)")
struct RateLimiterTests {
    @Test("pauses exactly as long as the bytes are ahead of the rate, past the burst")
    func pacing() {
        let limiter = RateLimiter(bytesPerSecond: 1_000_000, burstNanoseconds: 10_000_000)
        // 1 MB/s: 10,000 bytes cost 10 ms, all within the burst.
        #expect(limiter.charge(10_000, now: 1_000_000_000) == 0)
        // Another 10 ms worth: 10 ms ahead of the burst allowance.
        #expect(limiter.charge(10_000, now: 1_000_000_000) == 10_000_000)
        // After waiting it out, the next charge is within the burst again.
        #expect(limiter.charge(1, now: 1_020_000_000) == 0)
        // Idle time does not bank credit beyond the burst.
        #expect(limiter.charge(30_000, now: 5_000_000_000) == 20_000_000)
    }

    @Test("n bytes over t seconds converge to the rate")
    func average() {
        let limiter = RateLimiter(bytesPerSecond: 4_000_000)
        var now: UInt64 = 1_000_000_000
        let start = now
        var sent = 0
        while now - start < 3_000_000_000 {
            sent += 65536
            now += limiter.charge(65536, now: now)
        }
        let rate = Double(sent) / (Double(now - start) / 1e9)
        #expect(abs(rate - 4_000_000) / 4_000_000 < 0.05, "\(rate)")
    }
}
