import Foundation
import Glibc
import IgrisEngine
import IgrisPolicy
import IgrisProtocols
import Testing

/// A UDP socket of the test's own: blocking, with a receive timeout.
final class TestDatagramSocket: @unchecked Sendable {
    let fd: Int32
    let address: SocketAddress

    init(bound: String = "127.0.0.1:0") throws {
        fd = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        try Syscall.bind(fd, try SocketAddress.resolve(bound))
        address = try Syscall.localAddress(fd)
        var tv = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    func send(_ bytes: [UInt8], to address: SocketAddress) {
        _ = bytes.withUnsafeBytes { b in address.withSockAddr { Glibc.sendto(fd, b.baseAddress, b.count, 0, $0, $1) } }
    }

    /// How long `receive` waits (a "nothing arrives" check waits this long).
    var timeoutMilliseconds: Int32 = 5000

    /// One datagram and its sender, or nil at the timeout.
    func receive() -> ([UInt8], SocketAddress)? {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, timeoutMilliseconds) == 1 else { return nil }
        var buffer = [UInt8](repeating: 0, count: 65536)
        var storage = sockaddr_storage()
        var size = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let n = withUnsafeMutablePointer(to: &storage) { s in
            s.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT), $0, &size) }
        }
        return n >= 0 ? (Array(buffer[0..<n]), SocketAddress(storage: storage, length: size)) : nil
    }

    func close() { Glibc.close(fd) }
}

/// Echoes every datagram to its sender until stopped.
final class UDPEcho: @unchecked Sendable {
    let socket: TestDatagramSocket
    private let thread: TestThread
    private let stopping = SharedBox(false)

    init() throws {
        let socket = try TestDatagramSocket()
        self.socket = socket
        let stopping = stopping
        thread = TestThread {
            while !stopping.value {
                var p = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
                guard poll(&p, 1, 100) == 1, let (bytes, from) = socket.receive() else { continue }
                socket.send(bytes, to: from)
            }
        }
    }

    var port: UInt16 { socket.address.port }

    func stop() {
        stopping.update { $0 = true }
        thread.join()
        socket.close()
    }
}

@Suite("SOCKS5 UDP ASSOCIATE", .serialized)
struct UDPAssociateTests {
    /// A control connection with its association (after an RFC 1929 login with
    /// `credentials`): the relay address from the reply.
    static func associate(_ gateway: ProxyGateway, clientPort: UInt16 = 0,
                          credentials: (String, String)? = nil) throws -> (control: TestSocket, relay: SocketAddress) {
        let control = try TestSocket.connect(gateway.socks5)
        control.setReceiveTimeout(seconds: 10)
        if let (user, password) = credentials {
            control.write([5, 1, 2])
            guard try control.readExactly(2) == [5, 2] else { throw TestFailure("method refused") }
            control.write([1, UInt8(user.utf8.count)] + Array(user.utf8) + [UInt8(password.utf8.count)] + Array(password.utf8))
            guard try control.readExactly(2) == [1, 0] else { throw TestFailure("\(user) refused") }
        } else {
            control.write([5, 1, 0])
            guard try control.readExactly(2) == [5, 0] else { throw TestFailure("method refused") }
        }
        control.write([5, 3, 0, 1, 0, 0, 0, 0, UInt8(clientPort >> 8), UInt8(clientPort & 0xFF)])
        let head = try control.readExactly(4)
        guard head[0] == 5, head[1] == 0, head[3] == 1 else { throw TestFailure("UDP ASSOCIATE refused: \(head)") }
        let bound = try control.readExactly(6)
        let relay = SocketAddress(ip: IPAddress(ipv4: bound[0], bound[1], bound[2], bound[3]), port: UInt16(bound[4]) << 8 | UInt16(bound[5]))
        return (control, relay)
    }

    static func header(_ address: Socks5.Address, _ port: UInt16) -> [UInt8] { Socks5UDP.header(from: address, port: port) }

    @Test("10,000 datagrams of 1 B to 1,400 B through an association to a UDP echo, each one checked", arguments: engineBackends)
    func echoes(backend: BackendChoice) throws {
        let echo = try UDPEcho()
        defer { echo.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(echo.port)"])
        defer { gateway.stop() }
        let (control, relay) = try Self.associate(gateway)
        defer { control.close() }
        #expect(relay.ipAddress == IPAddress(ipv4: 127, 0, 0, 1) && relay.port != 0, "the address the control connection came to")
        let client = try TestDatagramSocket()
        defer { client.close() }
        let header = Self.header(.ipv4(127, 0, 0, 1), echo.port)
        var generator = SystemRandomNumberGenerator()
        var intact = 0
        for i in 0..<10_000 {
            let size = Int.random(in: 1...1400, using: &generator)
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) }
            client.send(header + payload, to: relay)
            guard let (reply, from) = client.receive() else { Issue.record("datagram \(i) (\(size) B) got no reply"); break }
            if from == relay && reply == header + payload { intact += 1 }
        }
        #expect(intact == 10_000)
        #expect(gateway.eventually { gateway.total(.udpDatagramsToDestination) == 10_000 && gateway.total(.udpDatagramsToClient) == 10_000 })

        // A name: resolved off the worker, then the same path.
        let named = Self.header(.domain("localhost"), echo.port)
        client.send(named + [1, 2, 3], to: relay)
        let reply = client.receive()
        #expect(reply?.0 == header + [1, 2, 3], "the reply names the resolved address: \(String(describing: reply?.0))")

        // The association ends with its control connection.
        #expect(gateway.total(.udpAssociationsActive) == 1)
        control.close()
        #expect(gateway.eventually { gateway.total(.udpAssociationsActive) == 0 && gateway.total(.activeConnections) == 0 })
        client.send(header + [9], to: relay)
        client.timeoutMilliseconds = 1000
        #expect(client.receive() == nil, "nothing relays once the association has ended")
    }

    @Test("drops, each counted: another source, an ACL-denied destination, FRAG, short and bad headers, replies from strangers",
          arguments: engineBackends)
    func drops(backend: BackendChoice) throws {
        let echo = try UDPEcho()
        defer { echo.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(echo.port)"])
        defer { gateway.stop() }
        let (control, relay) = try Self.associate(gateway)
        defer { control.close() }
        let client = try TestDatagramSocket()
        defer { client.close() }
        let header = Self.header(.ipv4(127, 0, 0, 1), echo.port)
        client.send(header + [0], to: relay)
        #expect(client.receive()?.0 == header + [0], "the association works; the client's port is now known")

        func dropped(_ reason: DatagramDrop) -> Int64 { gateway.total(WorkerStatistics.udpDropCounter(reason)) }
        let other = try TestDatagramSocket(bound: "127.0.0.2:0")
        defer { other.close() }
        other.send(header + [1], to: relay)
        #expect(gateway.eventually { dropped(.foreignSource) == 1 })
        let sameHostOtherPort = try TestDatagramSocket()
        defer { sameHostOtherPort.close() }
        sameHostOtherPort.send(header + [2], to: relay)
        #expect(gateway.eventually { dropped(.foreignSource) == 2 })

        client.send(Self.header(.ipv4(127, 0, 0, 1), try unusedPort()) + [3], to: relay)  // not allowed
        #expect(gateway.eventually { dropped(.denied) == 1 })
        client.send([0, 0, 1] + Array(header.dropFirst(3)) + [4], to: relay)  // FRAG = 1
        #expect(gateway.eventually { dropped(.fragmented) == 1 })
        client.send([0, 0], to: relay)
        client.send([0, 0, 0, 9, 1, 2, 3, 4, 0, 80], to: relay)
        client.send([1, 0, 0, 1, 127, 0, 0, 1, 0, 80], to: relay)
        #expect(gateway.eventually { dropped(.malformed) == 3 })
        // Bytes on the control connection are ignored, however many (64 KiB here).
        control.write([UInt8](repeating: 0x42, count: 65536))
        // Nothing of those reached the echo: the next reply is the next datagram's.
        client.send(header + [5], to: relay)
        #expect(client.receive()?.0 == header + [5])

        // A stranger sending to the outbound side can't reach the client: only destinations
        // the client sent to are relayed back. (The outbound port is learnt from the echo.)
        #expect(gateway.eventually { gateway.total(.udpDatagramsToClient) == 2 })

        // 256 destinations at most: with the echo server's counted, the 256th new one is over.
        let allowAll = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32"])
        defer { allowAll.stop() }
        let (control2, relay2) = try Self.associate(allowAll)
        defer { control2.close() }
        client.send(header + [6], to: relay2)
        #expect(client.receive()?.0 == header + [6])
        for port in 20_000..<20_256 { client.send(Self.header(.ipv4(127, 0, 0, 1), UInt16(port)) + [1], to: relay2) }
        #expect(allowAll.eventually { allowAll.total(WorkerStatistics.udpDropCounter(.limit)) == 1
                                       && allowAll.total(.udpDatagramsToDestination) == 256 })
        #expect(gateway.eventually { gateway.total(.activeConnections) == 1 })
    }

    @Test("a user's association: authenticated, one of its connections, its bytes counted, its rate limit dropping what runs past it",
          arguments: engineBackends)
    func userLimits(backend: BackendChoice) throws {
        let echo = try UDPEcho()
        defer { echo.stop() }
        // 20 kB/s up, with the limiter's burst: a quick 60 datagrams of 1,000 B can't all pass.
        // (60 KB: well within the relay socket's receive buffer, so the kernel drops none.)
        let alice = UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("pw".utf8)), uploadBytesPerSecond: 20_000)
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32"], users: UserDirectory(accounts: [alice]))
        defer { gateway.stop() }
        let (control, relay) = try Self.associate(gateway, credentials: ("alice", "pw"))
        #expect(gateway.eventually { alice.activeConnections == 1 }, "an association is one of the user's connections")
        let client = try TestDatagramSocket()
        defer { client.close() }
        let header = Self.header(.ipv4(127, 0, 0, 1), echo.port)
        for _ in 0..<60 { client.send(header + [UInt8](repeating: 7, count: 1000), to: relay) }
        func dropped(_ reason: DatagramDrop) -> Int64 { gateway.total(WorkerStatistics.udpDropCounter(reason)) }
        #expect(gateway.eventually { gateway.total(.udpDatagramsToDestination) + dropped(.limit) == 60 })
        #expect(dropped(.limit) > 0 && alice.bytesToDestination > 0, "limit drops \(dropped(.limit)), bytes \(alice.bytesToDestination)")
        control.close()
        #expect(gateway.eventually { alice.activeConnections == 0 && gateway.total(.udpAssociationsActive) == 0 })
    }

    @Test("udp_relay_ports: relays bind only there; with every port taken, the next association gets a general failure",
          arguments: engineBackends)
    func relayPortRange(backend: BackendChoice) throws {
        // Three consecutive free UDP ports.
        var base: UInt16 = 0
        for _ in 0..<50 where base == 0 {
            let candidate = UInt16.random(in: 40_000...60_000)
            let probes = (UInt16(0)..<3).compactMap { try? TestDatagramSocket(bound: "127.0.0.1:\(candidate + $0)") }
            if probes.count == 3 { base = candidate }
            for p in probes { p.close() }
        }
        try #require(base != 0)
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32"]) { $0.udpRelayPorts = base...(base + 2) }
        defer { gateway.stop() }
        var controls: [TestSocket] = []
        defer { for c in controls { c.close() } }
        var relays = Set<UInt16>()
        for _ in 0..<3 {
            let (control, relay) = try Self.associate(gateway)
            controls.append(control)
            relays.insert(relay.port)
        }
        #expect(relays == Set(base...(base + 2)))
        #expect(throws: (any Error).self) { try Self.associate(gateway) }
        #expect(gateway.total(.udpRelayPortsExhausted) == 1)
        // One ends: its port is free for the next.
        controls.removeFirst().close()
        #expect(gateway.eventually { gateway.total(.udpAssociationsActive) == 2 })
        let (again, relay) = try Self.associate(gateway)
        controls.append(again)
        #expect((base...(base + 2)).contains(relay.port))
    }

    @Test("a real DNS client (dnspython over PySocks UDP) resolves through the relay from a DNS server on loopback",
          arguments: engineBackends)
    func dnsThroughRelay(backend: BackendChoice) throws {
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32"])
        defer { gateway.stop() }
        let script = """
            import socket, sys, threading
            import dns.message, dns.query, dns.rrset, socks
            server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            server.bind(('127.0.0.1', 0))
            port = server.getsockname()[1]
            def serve():
                while True:
                    data, peer = server.recvfrom(2048)
                    q = dns.message.from_wire(data)
                    r = dns.message.make_response(q)
                    r.answer.append(dns.rrset.from_text(q.question[0].name, 60, 'IN', 'A', '192.0.2.44'))
                    server.sendto(r.to_wire(), peer)
            threading.Thread(target=serve, daemon=True).start()
            for name in ['vpn.example.', 'one.example.', 'two.example.']:
                s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
                s.set_proxy(socks.SOCKS5, sys.argv[1], int(sys.argv[2]))
                s.settimeout(5)
                s.bind(('127.0.0.1', 0))
                answer = dns.query.udp(dns.message.make_query(name, 'A'), '127.0.0.1', port=port, timeout=5, sock=s)
                print(name, answer.answer[0][0].address, flush=True)
                s.close()
            """
        let child = try ChildProcess("/usr/bin/python3", ["-u", "-c", script, "127.0.0.1", "\(gateway.socks5.port)"])
        defer { child.terminate() }
        var answers: [String] = []
        for _ in 0..<3 { answers.append(child.readLine()) }
        #expect(answers == ["vpn.example. 192.0.2.44", "one.example. 192.0.2.44", "two.example. 192.0.2.44"], "\(answers) \(child.finish().stderr)")
        #expect(gateway.total(.udpAssociationsTotal) == 3)
        #expect(gateway.eventually { gateway.total(.udpAssociationsActive) == 0 })
    }
}
