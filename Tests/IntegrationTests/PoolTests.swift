import Foundation
import Glibc
import IgrisEngine
import Testing

/// Forward listeners over upstream pools: balancing, failover within the connect timeout,
/// health checks taking a server out and back.
@Suite("Upstream pools", .serialized)
struct PoolTests {
    /// An echo server that says which one it is: the first byte back is its id.
    static func namedUpstream(_ id: UInt8) throws -> TestUpstream {
        try TestUpstream { socket in
            var byte: UInt8 = 0
            while withUnsafeMutableBytes(of: &byte, { socket.read(into: $0) }) == 1 {
                socket.write([id])
            }
            socket.close()
        }
    }

    static func start(_ pool: UpstreamPool, backend: BackendChoice, configure: (inout ServerConfiguration) -> Void = { _ in }) throws -> Server {
        var c = ServerConfiguration(listeners: [ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), name: "web", pool: pool)],
                                    workers: 2, backend: backend)
        configure(&c)
        let server = try Server(configuration: c)
        try server.start()
        return server
    }

    /// Which server answers a new connection (from `source`, when given); the connection is
    /// kept open when `keep` is set.
    static func ask(_ address: SocketAddress, from source: String? = nil, keep: inout [TestSocket]) throws -> UInt8 {
        let fd = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
        if let source { try Syscall.bind(fd, try SocketAddress.resolve("\(source):0")) }
        guard address.withSockAddr({ Glibc.connect(fd, $0, $1) }) == 0 else { Glibc.close(fd); throw TestFailure("connect failed") }
        let s = TestSocket(fd: fd)
        s.setReceiveTimeout(seconds: 10)
        s.write([0])
        let id = try s.readExactly(1)[0]
        keep.append(s)
        return id
    }

    @Test("round_robin spreads, least_conn fills the emptiest, source_hash keeps a client on its server", arguments: engineBackends)
    func balancing(backend: BackendChoice) throws {
        let upstreams = try (1...3).map { try Self.namedUpstream(UInt8($0)) }
        defer { for u in upstreams { u.stop() } }
        let servers = upstreams.map(\.address)

        var open: [TestSocket] = []
        defer { for s in open { s.close() } }
        let rr = try Self.start(UpstreamPool(name: "rr", servers: servers, balance: .roundRobin), backend: backend)
        var counts = [UInt8: Int]()
        for _ in 0..<30 { counts[try Self.ask(rr.listenAddresses[0], keep: &open), default: 0] += 1 }
        rr.beginDrain(); for s in open { s.close() }; open.removeAll(); rr.wait()
        #expect(counts == [1: 10, 2: 10, 3: 10], "\(counts)")

        // least_conn: with every connection held open, the counts stay level.
        let lcPool = UpstreamPool(name: "lc", servers: servers, balance: .leastConn)
        let lc = try Self.start(lcPool, backend: backend)
        counts = [:]
        var ids: [UInt8] = []
        for _ in 0..<12 {
            let id = try Self.ask(lc.listenAddresses[0], keep: &open)
            ids.append(id)
            counts[id, default: 0] += 1
        }
        #expect(counts == [1: 4, 2: 4, 3: 4], "\(counts)")
        // Close server 1's connections: it is now the emptiest, so the next ones go to it.
        for (s, id) in zip(open, ids) where id == 1 { s.close() }
        open = zip(open, ids).filter { $0.1 != 1 }.map(\.0)
        for _ in 0..<1000 where lcPool.activeConnections(0) > 0 { usleep(5000) }  // bounded: 5 s
        #expect(lcPool.activeConnections(0) == 0)
        for _ in 0..<3 { #expect(try Self.ask(lc.listenAddresses[0], keep: &open) == 1) }
        lc.beginDrain(); for s in open { s.close() }; open.removeAll(); lc.wait()

        let sh = try Self.start(UpstreamPool(name: "sh", servers: servers, balance: .sourceHash), backend: backend)
        var chosen = [String: Set<UInt8>]()
        for client in ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15", "127.0.0.16"] {
            for _ in 0..<4 { chosen[client, default: []].insert(try Self.ask(sh.listenAddresses[0], from: client, keep: &open)) }
        }
        sh.beginDrain(); for s in open { s.close() }; open.removeAll(); sh.wait()
        #expect(chosen.values.allSatisfy { $0.count == 1 }, "each client always lands on one server: \(chosen)")
        #expect(Set(chosen.values.map { $0.first! }).count > 1, "different clients spread: \(chosen)")
    }

    @Test("a dead server is skipped within the connect timeout: every connection gets through", arguments: engineBackends)
    func failover(backend: BackendChoice) throws {
        let alive = try Self.namedUpstream(7)
        defer { alive.stop() }
        let dead = try SocketAddress.resolve("127.0.0.1:\(try unusedPort())")
        let server = try Self.start(UpstreamPool(name: "f", servers: [dead, alive.address, dead.withPort(try unusedPort())]), backend: backend)
        var open: [TestSocket] = []
        for _ in 0..<9 { #expect(try Self.ask(server.listenAddresses[0], keep: &open) == 7) }
        for s in open { s.close() }
        #expect(server.total(.connectFailures) >= 6)
        server.beginDrain()
        server.wait()
    }

    @Test("health checks take a stopped server out of rotation and put it back when it returns", arguments: engineBackends)
    func healthChecks(backend: BackendChoice) throws {
        let stable = try Self.namedUpstream(1)
        defer { stable.stop() }
        var flaky: TestUpstream? = try Self.namedUpstream(2)
        let flakyAddress = flaky!.address
        let pool = UpstreamPool(name: "hc", servers: [stable.address, flakyAddress], balance: .roundRobin,
                                healthCheck: HealthCheck(intervalNanoseconds: 50_000_000, timeoutNanoseconds: 50_000_000, rise: 2, fall: 2))
        let server = try Self.start(pool, backend: backend)
        defer { server.beginDrain(); server.wait() }
        func waitFor(_ condition: () -> Bool) -> Bool {
            for _ in 0..<1000 { if condition() { return true }; usleep(5000) }  // bounded: 5 s
            return condition()
        }
        #expect(pool.isUp(1))
        flaky!.stop()
        flaky = nil
        #expect(waitFor { !pool.isUp(1) }, "the stopped server leaves rotation")
        #expect(pool.isUp(0))
        var open: [TestSocket] = []
        for _ in 0..<6 { #expect(try Self.ask(server.listenAddresses[0], keep: &open) == 1) }
        for s in open { s.close() }
        open.removeAll()
        let failuresWhileDown = server.total(.connectFailures)
        #expect(failuresWhileDown == 0, "no client was sent to the dead server")

        // The server comes back on the same address.
        let (fd, _) = try listeningSocket("\(flakyAddress)", backlog: 64)
        defer { Glibc.close(fd) }
        #expect(waitFor { pool.isUp(1) }, "it returns after `rise` good checks")
        #expect(server.total(.serversDown) == 1 && server.total(.serversUp) == 1)
    }
}

/// Settings a listener overrides: splice, idle timeout, max_connections.
@Suite("Per-listener settings", .serialized)
struct ListenerSettingsTests {
    @Test("max_connections, idle_timeout and splice apply to their listener only", arguments: engineBackends)
    func overrides(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        var strict = ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: upstream.address, name: "strict")
        strict.maxConnections = 1
        strict.idleTimeoutNanoseconds = .some(200_000_000)
        strict.splice = .always
        let relaxed = ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: upstream.address, name: "relaxed")
        var c = ServerConfiguration(listeners: [strict, relaxed], workers: 2, backend: backend)
        c.splice = .never
        let server = try Server(configuration: c)
        try server.start()
        defer { server.beginDrain(); server.wait() }
        let (strictAddress, relaxedAddress) = (server.listenAddresses[0], server.listenAddresses[1])

        let first = try TestSocket.connect(strictAddress)
        first.setReceiveTimeout(seconds: 10)
        first.write(Array(repeating: 1, count: 300_000))
        #expect(try first.readExactly(300_000) == Array(repeating: 1, count: 300_000))
        // The client has its bytes once the kernel moved them; the worker counts the splice
        // when it reaps that completion, a moment later.
        #expect(eventually { server.total(.spliceBytes) >= 600_000 }, "strict splices")
        // strict holds one connection at a time: the second waits in the backlog (never
        // accepted only to be closed) until the first is closed by its 200 ms idle timeout.
        let second = try TestSocket.connect(strictAddress)
        second.setReceiveTimeout(seconds: 10)
        second.write([5])
        #expect(first.readOneByte() == 0, "the first is closed when idle")
        #expect(try second.readExactly(1) == [5], "then the second is served")
        #expect(server.total(.rejectedAtCapacity) == 0)
        second.close()

        // strict moved 300,000 bytes each way, then the second's byte each way.
        #expect(eventually { server.total(.spliceBytes) == 600_002 })
        let spliced = server.total(.spliceBytes)
        var relaxedSockets: [TestSocket] = []
        for _ in 0..<3 {
            let s = try TestSocket.connect(relaxedAddress)
            s.setReceiveTimeout(seconds: 10)
            s.write(Array(repeating: 2, count: 300_000))
            #expect(try s.readExactly(300_000) == Array(repeating: 2, count: 300_000))
            relaxedSockets.append(s)
        }
        #expect(server.total(.spliceBytes) == spliced, "relaxed copies")

        // strict's idle connection was closed after 200 ms; relaxed's stay open.
        #expect(server.total(.idleTimeouts) >= 1)
        for s in relaxedSockets {
            s.write([3])
            #expect(try s.readExactly(1) == [3])
            s.close()
        }
        first.close()
    }

    @Test("source: connections to a server come from each source address in turn, on both address families", arguments: engineBackends)
    func sourceAddresses(backend: BackendChoice) throws {
        // The upstream answers each byte with the last byte of the address the connection came from.
        let upstream = try TestUpstream { socket in
            let from = (try? Syscall.peerAddress(socket.fd))?.ipAddress.description ?? "?"
            let last = UInt8(from.split(separator: ".").last.flatMap { UInt8($0) } ?? 0)
            var byte: UInt8 = 0
            while withUnsafeMutableBytes(of: &byte, { socket.read(into: $0) }) == 1 { socket.write([last]) }
            socket.close()
        }
        defer { upstream.stop() }
        // An IPv6 source is skipped for an IPv4 server (the kernel can't connect from it).
        let sources = try ["127.0.0.2", "::1", "127.0.0.3", "127.0.0.4"].map { try SocketAddress.resolve($0.contains(":") ? "[\($0)]:0" : "\($0):0") }
        let server = try PoolTests.start(UpstreamPool(name: "src", servers: [upstream.address], sources: sources), backend: backend)
        var open: [TestSocket] = []
        var counts = [UInt8: Int]()
        for _ in 0..<12 { counts[try PoolTests.ask(server.listenAddresses[0], keep: &open), default: 0] += 1 }
        server.beginDrain(); for s in open { s.close() }; server.wait()
        #expect(Set(counts.keys) == [2, 3, 4], "\(counts)")
        #expect(counts.values.allSatisfy { $0 >= 3 }, "\(counts)")
        #expect(UpstreamPool.checkSource(try SocketAddress.resolve("127.0.0.9:0")) == nil)
        #expect(UpstreamPool.checkSource(try SocketAddress.resolve("192.0.2.1:0")) == "192.0.2.1 is not an address of this host")
    }
}
