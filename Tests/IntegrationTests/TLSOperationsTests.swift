import Foundation
import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisOperations
import IgrisPolicy
import IgrisTLS
import Testing

// TLS at scale and over time: many bridges, half-close from the upstream, reload during a
// transfer, certificate users on the proxies, the admin endpoint; and the hand-driven client.

extension TLSTests {
    @Test("1,000 concurrent TLS bridges, each verified by an echo (igris-load hold --tls)", arguments: engineBackends)
    func thousandBridges(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSFixtures.server())
        defer { g.stop() }
        let load = try ChildProcess(productPath("igris-load"), ["hold", "--connect", "\(g.forward)", "--tls", "--tls-ca", TLSFixtures.path("ca.pem"),
                                                                 "--connections", "1000", "--hold", "0.5"])
        #expect(load.readLine() == "hold open=1000")
        #expect(g.total(.activeConnections) == 1000)
        #expect(load.readLine() == "hold verified=1000 of=1000")
        #expect(load.finish(timeout: 60).status == 0)
        #expect(eventually(seconds: 20) { g.total(.activeConnections) == 0 })
        #expect(g.total(.tlsHandshakes) == 1000)
    }

    @Test("half-close through TLS, the upstream first: its FIN reaches the client as close_notify, the client's bytes still reach it after", arguments: engineBackends)
    func halfCloseUpstreamFirst(backend: BackendChoice) throws {
        let received = SharedBox<(count: Int, digest: [UInt8])>((0, []))
        let upstream = try TestUpstream { socket in
            _ = sendPattern(socket, seed: 5, count: 300_000)
            socket.shutdownWrite()
            let r = receiveDigest(socket)
            received.update { $0 = (r.received, r.digest) }
            socket.close()
        }
        defer { upstream.stop() }
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSFixtures.server())
        defer { g.stop() }
        let client = try ManualTLSClient(g.forward)
        let (session, socket) = (client.session, client.socket)
        func flush() { client.flush() }
        func receive() -> Bool { client.receive() }
        // Everything the upstream sent, then its end as close_notify.
        var hash = SHA256()
        var got = 0
        var plain = [UInt8](repeating: 0, count: 65536)
        reading: while true {
            switch plain.withUnsafeMutableBytes({ session.read(into: $0.baseAddress!, capacity: $0.count) }) {
            case .bytes(let n):
                plain.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                got += n
            case .wantInput:
                guard receive() else { break reading }
            case .closed: break reading
            case .failed(let f):
                Issue.record("read failed: \(f)")
                break reading
            }
        }
        #expect(got == 300_000 && hash.finish() == patternDigest(seed: 5, count: 300_000))
        // The other direction is still open: send, then close_notify and FIN.
        var stream = PatternStream(seed: 6)
        for _ in 0..<4 {
            plain.withUnsafeMutableBytes { stream.fill($0) }
            _ = plain.withUnsafeBytes { session.write($0.baseAddress!, count: $0.count) }
            flush()
        }
        session.shutdown()
        flush()
        socket.shutdownWrite()
        #expect(eventually { received.value.count == 4 * 65536 })
        #expect(received.value.digest == patternDigest(seed: 6, count: 4 * 65536))
        socket.close()
        #expect(eventually { g.total(.activeConnections) == 0 })
        #expect(g.total(.closedAborted) == 0)
    }

    @Test("certificates reload during a running transfer: it finishes intact on the old one, new connections get the new one", arguments: engineBackends)
    func reloadDuringTransfer(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let dir = NSTemporaryDirectory() + "igris-reload-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func install(_ name: String) throws {
            for ext in ["pem", "key"] {
                _ = try? FileManager.default.removeItem(atPath: "\(dir)/current.\(ext)")
                try FileManager.default.copyItem(atPath: TLSFixtures.path("\(name).\(ext)"), toPath: "\(dir)/current.\(ext)")
            }
        }
        try install("server")
        let yaml = """
            listeners:
              - name: tls
                mode: forward
                listen: 127.0.0.1:0
                upstream: \(upstream.address)
                tls: {certificate: \(dir)/current.pem, key: \(dir)/current.key}
            """
        let gateway = IgrisNegotiation.Gateway(policy: GatewayPolicy(acl: DestinationACL(rules: []), authenticator: nil))
        defer { gateway.shutdown() }
        var configuration = ServerConfiguration(listeners: try ConfigFile.parse(yaml, file: "igris.yaml").listenerRules(gateway: gateway), workers: 2, backend: backend)
        configuration.workers = 2
        let server = try Server(configuration: configuration)
        try server.start()
        defer { server.beginDrain(); server.wait() }
        let port = server.listenAddresses[0].port
        let transfer = try ChildProcess("/usr/bin/python3", [TLSFixtures.fixtures + "/tls_client.py", "echo", "\(port)", "\(24 << 20)", "--ca", TLSFixtures.path("ca.pem")])
        #expect(eventually { server.total(.bytesUpstreamToClient) > 0 })
        // Unchanged files: the listener stays.
        var summary = try server.reload(listeners: try ConfigFile.parse(yaml, file: "igris.yaml").listenerRules(gateway: gateway))
        #expect(summary.kept == ["tls"])
        try install("other")
        summary = try server.reload(listeners: try ConfigFile.parse(yaml, file: "igris.yaml").listenerRules(gateway: gateway))
        #expect(summary.added == ["tls"] && summary.removed == ["tls"])
        let fresh = try TLSFixtures.client(["handshake", "\(port)", "--name", "other.test"])
        #expect(fresh.status == 0, "a new connection after the reload: \(fresh.line)")
        let old = try TLSFixtures.client(["handshake", "\(port)", "--name", "localhost"])
        #expect(old.status == 1, "the old certificate is still served: \(old.line)")
        let line = transfer.readLine()
        #expect(transfer.finish(timeout: 120).status == 0 && line.count == 64, "the transfer across the reload: \(line)")
        #expect(server.total(.closedAborted) == 0)
    }
}

extension TLSTests {
    @Test("a client certificate's user needs no password on SOCKS5 (no-auth method) or the HTTPS proxy (no Proxy-Authorization)", arguments: engineBackends)
    func certificateUsersOnProxies(backend: BackendChoice) throws {
        let files = try FileServer()
        defer { files.stop() }
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let users = UserDirectory(accounts: [UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("secret".utf8)))])
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSFixtures.server(clientCA: true), users: users, auth: true)
        defer { g.stop() }
        let hex = files.digest.map { String(format: "%02x", $0) }.joined()
        let socks = try TLSFixtures.client(["socks5", "\(g.socks5.port)", "\(files.port)", "/blob",
                                            "--cert", TLSFixtures.path("alice.pem"), "--key", TLSFixtures.path("alice.key")])
        #expect(socks.status == 0 && socks.line == hex, "SOCKS5 with alice's certificate: \(socks.line)")
        let r = try curl(["--proxy", "https://localhost:\(g.http.port)", "--proxy-cacert", TLSFixtures.path("ca.pem"),
                          "--proxy-cert", TLSFixtures.path("alice.pem"), "--proxy-key", TLSFixtures.path("alice.key"),
                          "-p", "http://127.0.0.1:\(files.port)/blob"])
        #expect(r.status == 0 && r.digest == files.digest, "curl with alice's certificate: \(r.stderr)")
        #expect(g.total(.tlsClientIdentities) == 2)
        #expect(g.total(.authFailures) == 0)
        #expect(eventually { g.total(.activeConnections) == 0 })
        #expect(users.accounts[0].connectionsTotal == 2 && users.accounts[0].activeConnections == 0)
    }

    @Test("the admin endpoint over TLS: curl --cacert gets /healthz and /metrics (with the TLS families)")
    func adminOverTLS() throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let g = try TLSGateway(backend: .epoll, upstream: upstream.address, tls: try TLSFixtures.server())
        defer { g.stop() }
        let admin = try AdminServer(listen: try SocketAddress.resolve("127.0.0.1:0"), metrics: MetricsRenderer(server: g.server), tls: try TLSFixtures.server())
        admin.start()
        defer { admin.stop() }
        let health = try curl(["--cacert", TLSFixtures.path("ca.pem"), "https://localhost:\(admin.address.port)/healthz"])
        #expect(health.status == 0, "\(health.stderr)")
        let out = NSTemporaryDirectory() + "igris-admin-\(getpid()).txt"
        defer { unlink(out) }
        let (status, stderr) = try runCommand("/usr/bin/curl", ["-sS", "--max-time", "20", "--cacert", TLSFixtures.path("ca.pem"), "-o", out,
                                                                "https://localhost:\(admin.address.port)/metrics"])
        #expect(status == 0, "\(stderr)")
        let text = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        for family in ["igris_tls_handshakes_total", "igris_tls_handshake_failures_total{reason=\"plaintext\"}", "igris_tls_handshake_duration_seconds_bucket"] {
            #expect(text.contains(family), "\(family) missing from /metrics")
        }
        // Plain HTTP to the HTTPS admin port: refused, and the endpoint keeps answering.
        let plain = try runCommand("/usr/bin/curl", ["-sS", "--max-time", "5", "http://127.0.0.1:\(admin.address.port)/healthz"])
        #expect(plain.status != 0)
        #expect(try curl(["--cacert", TLSFixtures.path("ca.pem"), "https://localhost:\(admin.address.port)/healthz"]).status == 0)
    }
}

/// A TLS client on a blocking test socket, driven step by step through IgrisTLS, for tests that
/// alter records or watch each end of the stream.
final class ManualTLSClient {
    let session: TLSSession
    let socket: TestSocket
    private var buffer = [UInt8](repeating: 0, count: 65536)

    /// Connects and completes the handshake (verifying the gateway as localhost).
    init(_ address: SocketAddress) throws {
        var settings = TLSClientSettings()
        settings.ca = TLSFixtures.path("ca.pem")
        guard let session = try TLSClientContext(settings).makeSession(host: "localhost") else { throw TestFailure("no TLS session") }
        self.session = session
        socket = try TestSocket.connect(address)
        socket.setReceiveTimeout(seconds: 10)
        var step = session.handshake()
        while step == .wantInput {
            flush()
            guard receive() else { break }
            step = session.handshake()
        }
        guard step == .done else { throw TestFailure("handshake: \(step)") }
        flush()
    }

    /// Sends every pending record.
    func flush() {
        while session.pendingOutput > 0 {
            let n = buffer.withUnsafeMutableBytes { session.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
            #expect(socket.write(Array(buffer.prefix(n))))
        }
    }

    /// Feeds what the socket has; false at EOF or error.
    func receive() -> Bool {
        let n = buffer.withUnsafeMutableBytes { socket.read(into: $0) }
        guard n > 0 else { return false }
        buffer.withUnsafeBytes { session.feed($0.baseAddress!, count: n) }
        return true
    }
}

extension TLSTests {
    @Test("upstream_tls: a pool server that fails the handshake (it isn't TLS) is skipped for the next one, like a failed connect", arguments: engineBackends)
    func upstreamTLSFailover(backend: BackendChoice) throws {
        let echo = try echoUpstream()
        defer { echo.stop() }
        // The pool: a plain echo server (the handshake fails against it) and igris's own TLS
        // listener in front of the same echo.
        var tlsIn = ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: echo.address, name: "tls-in")
        tlsIn.tls = try TLSFixtures.server()
        let front = try Server(configuration: ServerConfiguration(listeners: [tlsIn], workers: 1, backend: backend))
        try front.start()
        defer { front.beginDrain(); front.wait() }
        var settings = TLSClientSettings()
        settings.ca = TLSFixtures.path("ca.pem")
        settings.serverName = "localhost"
        let pool = UpstreamPool(name: "mixed", servers: [echo.address, front.listenAddresses[0]], tls: try TLSClientContext(settings))
        let server = try Server(configuration: ServerConfiguration(listeners: [
            ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), name: "plain-in", pool: pool),
        ], workers: 1, backend: backend))
        try server.start()
        defer { server.beginDrain(); server.wait() }
        for i in 0..<4 {
            let client = try TestSocket.connect(server.listenAddresses[0])
            client.setReceiveTimeout(seconds: 10)
            let message = [UInt8]("connection \(i)".utf8)
            #expect(client.write(message))
            #expect(try client.readExactly(message.count) == message, "connection \(i)")
            client.close()
        }
        // Round robin sent half of them to the plain server first.
        #expect(server.total(WorkerStatistics.tlsFailureCounter(.plaintext)) + server.total(WorkerStatistics.tlsFailureCounter(.malformed)) >= 1)
        #expect(server.total(.tlsHandshakes) == 4)
        #expect(eventually { server.total(.activeConnections) == 0 })
    }
}
