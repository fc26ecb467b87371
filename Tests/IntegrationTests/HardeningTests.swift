import Foundation
import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisPolicy
import IgrisProtocols
import Testing

/// What an attacker tries first: a password-guessing flood, idle sockets that never finish
/// a handshake, and accounts that should stop working (expiry, removal on reload).
@Suite("Hardening", .serialized)
struct HardeningTests {
    static func loopback(_ n: UInt8) -> SocketAddress { SocketAddress(ip: IPAddress(ipv4: 127, 0, 0, n), port: 0) }

    static func credentials(_ user: String, _ password: String) -> [UInt8] {
        [1, UInt8(user.utf8.count)] + Array(user.utf8) + [UInt8(password.utf8.count)] + Array(password.utf8)
    }

    /// A SOCKS5 login and CONNECT from `source`, then an echo through the tunnel; the
    /// tunnel stays open. `patience`: seconds each answer may take (a flood is running).
    static func tunnel(_ gateway: ProxyGateway, _ user: String, _ password: String, from source: SocketAddress,
                       to port: UInt16, patience: Int = 60) throws -> TestSocket {
        let s = try TestSocket.connect(gateway.socks5, from: source)
        s.setReceiveTimeout(seconds: patience)
        s.write([5, 1, 2])
        guard try s.readExactly(2) == [5, 2] else { throw TestFailure("no username/password method") }
        s.write(credentials(user, password))
        let status = try s.readExactly(2)
        guard status == [1, 0] else { throw TestFailure("\(user) refused: \(status)") }
        s.write(Socks5Client.request(.ipv4(127, 0, 0, 1), port: port))
        guard try Socks5Client.readReply(s) == 0 else { throw TestFailure("\(user): CONNECT refused") }
        s.write(Array(user.utf8))
        guard try s.readExactly(user.utf8.count) == Array(user.utf8) else { throw TestFailure("\(user): echo mismatch") }
        return s
    }

    /// Waits for the gateway to end a connection: EOF or a reset, not the receive timeout.
    static func closedByGateway(_ s: TestSocket) -> Bool {
        s.setReceiveTimeout(seconds: 30)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { s.read(into: $0) }
            if n > 0 { continue }
            return n == 0 || (n != -Int(EAGAIN) && n != -Int(EINTR))
        }
    }

    static func elapsed(since start: UInt64) -> String {
        String(format: "%.2f s", Double(Syscall.monotonicNanoseconds() - start) / 1e9)
    }

    @Test("password-guessing flood: a cached user gets in at once, an uncached one in its turn, and checks for clients that left are skipped",
          arguments: engineBackends)
    func passwordFlood(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let port = upstream.address.port
        let users = UserDirectory(accounts: [
            UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("alice-pw".utf8))),
            UserAccount(name: "bob", passwordHash: try PasswordHasher.hash(Array("bob-pw".utf8))),
        ])
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(port)"], users: users,
                                       handshakeTimeout: 120_000_000_000)
        defer { gateway.stop() }
        let auth = try #require(gateway.policy.authenticator)
        let queue = gateway.gateway.passwordCheckQueue

        // alice logged in before the flood: her success is cached.
        try Self.tunnel(gateway, "alice", "alice-pw", from: Self.loopback(2), to: port).close()

        // 16 sources, 8 guesses each (under the per-source limit of 10), each under a name of
        // its own (so no name locks), every connection left waiting for its answer.
        let sources = 16, guesses = 8
        var flood: [TestSocket] = []
        for source in 0..<sources {
            for k in 0..<guesses {
                let s = try TestSocket.connect(gateway.socks5, from: Self.loopback(UInt8(10 + source)))
                s.write([5, 1, 2] + Self.credentials("guess\(source)x\(k)", "password\(k)"))
                flood.append(s)
            }
        }
        #expect(eventually { queue.waitingCount > 0 }, "the flood is queued")

        var start = Syscall.monotonicNanoseconds()
        let cacheHits = auth.cacheHitCount
        let alice = try Self.tunnel(gateway, "alice", "alice-pw", from: Self.loopback(2), to: port)
        let aliceTime = Self.elapsed(since: start)
        #expect(auth.cacheHitCount == cacheHits + 1, "answered from the cache, not queued behind the flood")

        start = Syscall.monotonicNanoseconds()
        let waitingAhead = queue.waitingCount
        let bob = try Self.tunnel(gateway, "bob", "bob-pw", from: Self.loopback(3), to: port)
        let bobTime = Self.elapsed(since: start)

        // The attackers give up: what they left queued is skipped, not run.
        let runsAtClose = auth.kdfRunCount
        for s in flood { s.close() }
        #expect(eventually(seconds: 60) { queue.waitingCount == 0 })
        let runsAfterClose = auth.kdfRunCount - runsAtClose
        #expect(queue.skippedCount > 0)
        #expect(runsAfterClose < Int64(sources * guesses / 2), "\(runsAfterClose) checks ran after their clients left")
        print("password flood (\(backend.rawValue)): \(sources * guesses) guesses from \(sources) sources; cached login \(aliceTime), "
              + "uncached login \(bobTime) with \(waitingAhead) checks queued; after the flood left: \(runsAfterClose) checks ran, "
              + "\(queue.skippedCount) skipped, \(queue.refusedCount) refused for room")
        for s in [alice, bob] {
            s.write([7])
            #expect(try s.readExactly(1) == [7])
            s.close()
        }
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("idle sockets that never finish a handshake can't take every connection: the source is capped, the next client gets in",
          arguments: engineBackends)
    func handshakeCaps(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let port = upstream.address.port
        let users = UserDirectory(accounts: [UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("pw".utf8)))])
        let limits = SourceLimits.Settings.defaults(maxConnections: 20)
        #expect(limits == SourceLimits.Settings(maxConnectionsPerSource: 5, maxHandshakes: 10, maxHandshakesPerSource: 5))
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(port)"], users: users,
                                       handshakeTimeout: 120_000_000_000) {
            $0.workers = 1  // max_handshakes is enforced per worker, as its share
            $0.maxConnections = 20
            $0.sourceLimits = limits
        }
        defer { gateway.stop() }

        // 20 idle sockets from one address (the whole max_connections): 5 are kept, the
        // rest closed at once.
        var idle: [TestSocket] = []
        for _ in 0..<20 { idle.append(try TestSocket.connect(gateway.socks5, from: Self.loopback(4))) }
        let idleOpened = Syscall.monotonicNanoseconds()
        #expect(gateway.eventually { gateway.total(.sourceHandshakeRejections) == 15 })
        #expect(gateway.eventually { idle.filter(Self.closedByGatewayNow).count >= 15 })
        let kept = idle.filter { !Self.closedByGatewayNow($0) }
        #expect(kept.count == 5)
        // A real client from elsewhere gets through.
        let alice = try Self.tunnel(gateway, "alice", "pw", from: Self.loopback(2), to: port)

        // The global handshake cap (10): more idle sources fill it. A newcomer then takes the
        // place of the oldest handshake stalled on its client (those from .4, seconds old by
        // now), rather than every newcomer being refused until the handshake timeout.
        for _ in 0..<4 { idle.append(try TestSocket.connect(gateway.socks5, from: Self.loopback(5))) }
        idle.append(try TestSocket.connect(gateway.http, from: Self.loopback(6)))
        #expect(gateway.eventually { gateway.total(.handshakesActive) == 10 })
        // Only a handshake stalled on its client for 2 s may be evicted (the engine's
        // stalledHandshakeNanoseconds): the newcomer comes once those from .4 are that old.
        let stalledAt = idleOpened + 2_200_000_000
        let now = Syscall.monotonicNanoseconds()
        if now < stalledAt { usleep(UInt32((stalledAt - now) / 1000)) }
        let newcomer = try TestSocket.connect(gateway.http, from: Self.loopback(7))
        #expect(gateway.eventually { gateway.total(.handshakesEvicted) == 1 })
        #expect(gateway.total(.handshakesActive) == 10 && gateway.total(.handshakeLimitRejections) == 0)
        #expect(gateway.eventually { kept.contains(where: Self.closedByGatewayNow) })
        #expect(kept.filter(Self.closedByGatewayNow).count == 1, "one stalled handshake made room")
        #expect(!Self.closedByGatewayNow(newcomer))
        for s in idle[20...] + [newcomer] { s.close() }
        idle.removeLast(idle.count - 20)
        #expect(gateway.eventually { gateway.total(.handshakesActive) == 4 })

        // Open tunnels count against their source too (max_connections_per_source: 5).
        var tunnels = [alice]
        for _ in 0..<4 { tunnels.append(try Self.tunnel(gateway, "alice", "pw", from: Self.loopback(2), to: port)) }
        let sixth = try TestSocket.connect(gateway.socks5, from: Self.loopback(2))
        #expect(Self.closedByGateway(sixth))
        #expect(gateway.eventually { gateway.total(.sourceConnectionRejections) == 1 })
        tunnels.removeLast().close()
        #expect(gateway.eventually { gateway.total(.activeConnections) == 4 + 4 })
        tunnels.append(try Self.tunnel(gateway, "alice", "pw", from: Self.loopback(2), to: port))

        for s in idle + tunnels + [sixth] { s.close() }
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 && gateway.server.sourceLimits.sourcesNow == 0 })
        #expect(gateway.total(.handshakesActive) == 0)
    }

    /// Already closed by the gateway (EOF or reset waiting), without blocking. Asking again
    /// gives the same answer: after a reset is read, the socket reads end of stream.
    static func closedByGatewayNow(_ s: TestSocket) -> Bool {
        var byte: UInt8 = 0
        let n = Syscall.recv(s.fd, &byte, 1, flags: Int32(MSG_DONTWAIT))
        return n == 0 || (n < 0 && n != -Int(EAGAIN))
    }

    @Test("an account's expiry ends its open tunnels at that moment; a reload ends a removed user's tunnels and keeps the rest",
          arguments: engineBackends)
    func expiryAndRemoval(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let port = upstream.address.port
        let hash = try PasswordHasher.hash(Array("pw".utf8))
        // Whole seconds, as the users file has them: 2 to 3 s from now.
        let expiry = Int64(time(nil)) + 3
        let users = UserDirectory(accounts: [
            UserAccount(name: "alice", passwordHash: hash),
            UserAccount(name: "bob", passwordHash: hash),
            UserAccount(name: "carol", passwordHash: hash, expiresAt: expiry),
        ])
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(port)"], users: users)
        defer { gateway.stop() }
        let alice = try Self.tunnel(gateway, "alice", "pw", from: Self.loopback(2), to: port)
        let bob = try Self.tunnel(gateway, "bob", "pw", from: Self.loopback(2), to: port)
        let carol = try Self.tunnel(gateway, "carol", "pw", from: Self.loopback(2), to: port)
        // A UDP association is one of its user's connections too: it ends with the user.
        let (carolUDP, _) = try UDPAssociateTests.associate(gateway, credentials: ("carol", "pw"))
        let (bobUDP, _) = try UDPAssociateTests.associate(gateway, credentials: ("bob", "pw"))

        #expect(Self.closedByGateway(carol), "carol's tunnel ends at her expiry")
        #expect(Self.closedByGateway(carolUDP), "and her UDP association")
        var wallClock = timespec()
        clock_gettime(CLOCK_REALTIME, &wallClock)  // time() is the coarse clock: it may lag
        #expect(Int64(wallClock.tv_sec) >= expiry)
        #expect(gateway.total(.accountsRevoked) == 2)

        // The users file without bob, and with a new user.
        let auth = try #require(gateway.policy.authenticator)
        let (directory, changes) = auth.reload(UserDirectory(accounts: [
            UserAccount(name: "alice", passwordHash: hash), UserAccount(name: "carol", passwordHash: hash, expiresAt: expiry),
            UserAccount(name: "dave", passwordHash: hash),
        ]))
        #expect(changes.removed == ["bob"] && changes.added == ["dave"])
        gateway.server.updateAccounts(directory.accounts)
        #expect(Self.closedByGateway(bob), "bob's tunnel ends when he leaves the users file")
        #expect(Self.closedByGateway(bobUDP), "and his UDP association")
        #expect(gateway.total(.accountsRevoked) == 4)
        alice.write([1, 2, 3])
        #expect(try alice.readExactly(3) == [1, 2, 3], "alice's tunnel carries on")
        #expect(throws: (any Error).self) { try Self.tunnel(gateway, "bob", "pw", from: Self.loopback(2), to: port) }
        let dave = try Self.tunnel(gateway, "dave", "pw", from: Self.loopback(2), to: port)
        #expect(gateway.server.accounts.map(\.name) == ["alice", "bob", "carol", "dave"])
        for s in [alice, bob, carol, dave, carolUDP, bobUDP] { s.close() }
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("SIGHUP reloads the users file of `igris serve --users`: a removed user's tunnel closes, a new user logs in")
    func sighupReloadsUsers() throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let hash = try PasswordHasher.hash(Array("pw".utf8))
        func usersFile(_ names: [String]) -> String {
            "users:\n" + names.map { "  - name: \($0)\n    password_hash: \"\(hash)\"\n" }.joined()
        }
        let path = try writeTemporaryFile(usersFile(["alice", "bob"]))
        defer { unlink(path) }
        let port = try unusedPort()
        let child = try ChildProcess(productPath("igris"), ["serve", "--socks5", "127.0.0.1:\(port)", "--users", path,
                                                           "--allow", "127.0.0.1/32:\(upstream.address.port)", "--workers", "1"])
        defer { child.terminate() }
        let log = LogLines(child)
        #expect(log.wait(for: "listening"))
        let proxy = try SocketAddress.resolve("127.0.0.1:\(port)")
        func login(_ user: String) throws -> TestSocket {
            let (s, reply) = try Socks5Client.connect(proxy, to: .ipv4(127, 0, 0, 1), port: upstream.address.port, credentials: (user, "pw"))
            guard reply == 0 else { throw TestFailure("CONNECT refused: \(reply)") }
            return s
        }
        let alice = try login("alice")
        let bob = try login("bob")

        try usersFile(["alice", "carol"]).write(toFile: path, atomically: true, encoding: .utf8)
        chmod(path, 0o600)
        child.signal(SIGHUP)
        #expect(log.wait(for: "users reloaded"))
        #expect(log.lines.value.contains { $0.contains("users reloaded") && $0.contains("added=carol") && $0.contains("removed=bob") })
        #expect(Self.closedByGateway(bob))
        alice.write([5])
        #expect(try alice.readExactly(1) == [5])
        let carol = try login("carol")
        #expect(throws: (any Error).self) { try login("bob") }
        for s in [alice, bob, carol] { s.close() }
    }
}
