import Foundation
import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisOperations
import IgrisPolicy
import IgrisTLS
import Testing

/// Test certificates (Tests/fixtures/make-certs.sh), made once per test process and removed
/// when it exits.
enum TLSFixtures {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("fixtures").path
    static let directory: String = {
        let dir = NSTemporaryDirectory() + "igris-tls-\(getpid())"
        let (status, stderr) = try! runCommand("/bin/sh", [fixtures + "/make-certs.sh", dir])
        precondition(status == 0, "make-certs.sh: \(stderr)")
        atexit { try? FileManager.default.removeItem(atPath: TLSFixtures.directory) }
        return dir
    }()

    static func path(_ name: String) -> String { directory + "/" + name }
    static func files(_ name: String) -> TLSCertificateFiles { TLSCertificateFiles(certificate: path("\(name).pem"), key: path("\(name).key")) }

    static func server(_ name: String = "server", clientCA: Bool = false, minVersion: TLSVersion = .tls12) throws -> TLSServerContext {
        var settings = TLSServerSettings(certificate: files(name))
        if clientCA {
            settings.clientCA = path("ca.pem")
            settings.crl = path("crl.pem")
        }
        settings.minVersion = minVersion
        return try TLSServerContext(settings)
    }

    /// Runs Tests/fixtures/tls_client.py; its exit status and first line of output.
    static func client(_ arguments: [String]) throws -> (status: Int32, line: String) {
        let child = try ChildProcess("/usr/bin/python3", [fixtures + "/tls_client.py"] + arguments + ["--ca", path("ca.pem")])
        let line = child.readLine()
        let (status, stderr) = child.finish(timeout: 60)
        return (status, line.isEmpty ? stderr : line)
    }
}

/// An in-process gateway with TLS listeners: a forward to `upstream` and the two proxy modes.
final class TLSGateway: @unchecked Sendable {
    let server: Server
    let gateway: IgrisNegotiation.Gateway
    var forward: SocketAddress { server.listenAddresses[0] }
    var socks5: SocketAddress { server.listenAddresses[1] }
    var http: SocketAddress { server.listenAddresses[2] }

    init(backend: BackendChoice, upstream: SocketAddress, tls: TLSServerContext, users: UserDirectory? = nil,
         handshakeTimeout: UInt64 = 10_000_000_000, auth: Bool = false) throws {
        let options = GatewayOptions(requireAuthentication: auth, handshakeTimeoutNanoseconds: handshakeTimeout)
        gateway = IgrisNegotiation.Gateway(policy: GatewayPolicy(acl: DestinationACL(rules: [try DestinationACL.parseRule(.allow, "127.0.0.1/32").get()]),
                                                                 authenticator: try users.map { try Authenticator(directory: $0) }))
        var rules = [
            ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: upstream, name: "tls-forward"),
            try gateway.rule(listen: try SocketAddress.resolve("127.0.0.1:0"), name: "tls-socks", mode: .socks5, options: options),
            try gateway.rule(listen: try SocketAddress.resolve("127.0.0.1:0"), name: "tls-http", mode: .httpConnect, options: options),
        ]
        for i in rules.indices { rules[i].tls = tls }
        rules[0].handshakeTimeoutNanoseconds = handshakeTimeout
        var configuration = ServerConfiguration(listeners: rules, workers: 2, backend: backend)
        configuration.accounts = gateway.policy.accounts
        server = try Server(configuration: configuration)
        try server.start()
    }

    func stop() {
        server.beginDrain()
        server.wait()
        gateway.shutdown()
    }

    func total(_ counter: WorkerStatistics.Counter) -> Int64 { server.total(counter) }
}

@Suite(.serialized) struct TLSTests {
    @Test("an HTTPS proxy for curl (CONNECT and plain http://), SOCKS5 over TLS, a TLS forward with half-close", arguments: engineBackends)
    func clientsOverTLS(backend: BackendChoice) throws {
        let files = try FileServer()
        defer { files.stop() }
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSFixtures.server())
        defer { g.stop() }
        let hex = files.digest.map { String(format: "%02x", $0) }.joined()
        for tunnel in [false, true] {
            let r = try curl(["--proxy", "https://localhost:\(g.http.port)", "--proxy-cacert", TLSFixtures.path("ca.pem")]
                             + (tunnel ? ["-p"] : []) + ["http://127.0.0.1:\(files.port)/blob"])
            #expect(r.status == 0, "curl (tunnel \(tunnel)): \(r.stderr)")
            #expect(r.digest == files.digest, "curl through the HTTPS proxy (tunnel \(tunnel)): body differs")
        }
        let socks = try TLSFixtures.client(["socks5", "\(g.socks5.port)", "\(files.port)", "/blob"])
        #expect(socks.status == 0 && socks.line == hex, "SOCKS5 over TLS: \(socks.line)")
        // 3 MiB each way through the forward, then close_notify both ways (the echo's EOF).
        let echo = try TLSFixtures.client(["echo", "\(g.forward.port)", "\(3 << 20)"])
        #expect(echo.status == 0 && echo.line.count == 64, "TLS forward: \(echo.line)")
        #expect(eventually { g.total(.activeConnections) == 0 && g.total(.closedGracefully) >= 1 })
        #expect(g.total(.tlsHandshakes) >= 4)
        #expect(g.total(.closedAborted) == 0)
        // Every bridge's records went on without OpenSSL's SSL object (no kTLS here): the
        // forward's after its handshake, the two HTTPS-proxy ones and the SOCKS5 one after
        // their negotiation, from the records counted through it.
        #expect(g.total(.tlsRecordsWithoutOpenSSL) + g.total(.tlsOffloaded) == 4)
    }

    @Test("openssl s_client verifies the chain and gets TLS 1.3; a TLS 1.2-only client meets a 1.3 floor with a protocol_version alert", arguments: engineBackends)
    func versions(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSFixtures.server(minVersion: .tls13))
        defer { g.stop() }
        let ok = try runCommand("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(g.forward.port)", "-CAfile", TLSFixtures.path("ca.pem"),
                                                      "-servername", "localhost", "-verify_return_error", "-brief"], timeout: 20)
        #expect(ok.status == 0, "s_client: \(ok.stderr)")
        #expect(ok.stderr.contains("Verification: OK") && ok.stderr.contains("Protocol version: TLSv1.3"), "s_client: \(ok.stderr)")
        let old = try runCommand("/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(g.forward.port)", "-tls1_2", "-brief"], timeout: 20)
        #expect(old.status != 0)
        #expect(old.stderr.contains("alert protocol version"), "TLS 1.2 client: \(old.stderr)")
        let python = try TLSFixtures.client(["handshake", "\(g.forward.port)", "--max-version", "1.2"])
        #expect(python.status == 1 && python.line.contains("PROTOCOL_VERSION"), "\(python.line)")
        #expect(eventually { g.total(WorkerStatistics.tlsFailureCounter(.version)) == 2 })
    }

    @Test("session tickets resume (and survive across workers); plaintext, garbage, a stalled handshake, an unknown SNI each fail cleanly and are counted", arguments: engineBackends)
    func badInputAndResumption(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        var strict = TLSServerSettings()
        strict.sniCertificates = [TLSFixtures.files("server")]
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSServerContext(strict), handshakeTimeout: 1_000_000_000)
        defer { g.stop() }
        let resumed = try TLSFixtures.client(["handshake", "\(g.forward.port)", "--sessions", "4"])
        #expect(resumed.status == 0 && resumed.line.hasSuffix("resumed=3"), "\(resumed.line)")
        #expect(eventually { g.total(.tlsResumed) == 3 })
        // Each resumed connection gets a fresh ticket: an OpenSSL client uses a TLS 1.3 session
        // once, so a chain of connections resumes every time after the first.
        let churn = try ChildProcess(productPath("igris-load"), ["churn", "--connect", "\(g.forward)", "--tls", "--tls-ca", TLSFixtures.path("ca.pem"),
                                                                  "--connections", "1", "--duration", "0.3", "--json"])
        let report = churn.readLine()
        #expect(churn.finish().status == 0)
        let fields = report.split(separator: ",").reduce(into: [String: String]()) { d, kv in
            let parts = kv.split(separator: ":")
            if parts.count == 2 { d[parts[0].filter { $0 != "\"" && $0 != "{" }] = String(parts[1]) }
        }
        let connections = Int(fields["connections"] ?? "") ?? 0, resumedCount = Int(fields["resumed"] ?? "") ?? -1
        #expect(connections > 1 && resumedCount == connections - 1, "\(report)")

        // Plaintext HTTP to the TLS port: closed, counted as plaintext.
        let plain = try TestSocket.connect(g.forward)
        plain.setReceiveTimeout(seconds: 10)
        #expect(plain.write(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)))
        var buffer = [UInt8](repeating: 0, count: 1024)
        while buffer.withUnsafeMutableBytes({ plain.read(into: $0) }) > 0 {}
        plain.close()
        // A record header claiming a ClientHello, then garbage.
        let garbage = try TestSocket.connect(g.forward)
        garbage.setReceiveTimeout(seconds: 10)
        #expect(garbage.write([0x16, 0x03, 0x01, 0x00, 0x40] + [UInt8](repeating: 0xA5, count: 64)))
        while buffer.withUnsafeMutableBytes({ garbage.read(into: $0) }) > 0 {}
        garbage.close()
        // Half a ClientHello, then nothing: closed at the handshake timeout.
        let stalled = try TestSocket.connect(g.forward)
        stalled.setReceiveTimeout(seconds: 10)
        #expect(stalled.write([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]))
        while buffer.withUnsafeMutableBytes({ stalled.read(into: $0) }) > 0 {}
        stalled.close()
        // No default certificate: a name no certificate holds gets unrecognized_name.
        let unknown = try TLSFixtures.client(["handshake", "\(g.forward.port)", "--name", "nobody.test"])
        #expect(unknown.status == 1 && unknown.line.contains("UNRECOGNIZED_NAME"), "\(unknown.line)")
        #expect(eventually {
            g.total(WorkerStatistics.tlsFailureCounter(.plaintext)) == 1 && g.total(WorkerStatistics.tlsFailureCounter(.malformed)) == 1
                && g.total(WorkerStatistics.tlsFailureCounter(.timeout)) == 1 && g.total(WorkerStatistics.tlsFailureCounter(.unknownName)) == 1
                && g.total(.activeConnections) == 0
        }, "failures: plaintext \(g.total(WorkerStatistics.tlsFailureCounter(.plaintext))) malformed \(g.total(WorkerStatistics.tlsFailureCounter(.malformed))) timeout \(g.total(WorkerStatistics.tlsFailureCounter(.timeout))) unknown_name \(g.total(WorkerStatistics.tlsFailureCounter(.unknownName)))")
        // The worker is fine: a good client still gets through.
        let echo = try TLSFixtures.client(["echo", "\(g.forward.port)", "100000"])
        #expect(echo.status == 0, "\(echo.line)")
    }
}

extension TLSTests {
    @Test("client certificates name users (max_connections applies); another CA's, a revoked one, a missing one and an unknown name are refused", arguments: engineBackends)
    func clientCertificates(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let users = UserDirectory(accounts: [UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("unused".utf8)), maxConnections: 1)])
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSFixtures.server(clientCA: true), users: users)
        defer { g.stop() }
        func echo(_ who: String) throws -> (status: Int32, line: String) {
            try TLSFixtures.client(["echo", "\(g.forward.port)", "50000", "--cert", TLSFixtures.path("\(who).pem"), "--key", TLSFixtures.path("\(who).key")])
        }
        let alice = try echo("alice")
        #expect(alice.status == 0, "alice: \(alice.line)")
        #expect(g.total(.tlsClientIdentities) == 1)
        // alice holds her one connection; a second is refused after the handshake.
        let held = try ChildProcess("/usr/bin/openssl", ["s_client", "-quiet", "-connect", "127.0.0.1:\(g.forward.port)", "-CAfile", TLSFixtures.path("ca.pem"),
                                                         "-cert", TLSFixtures.path("alice.pem"), "-key", TLSFixtures.path("alice.key")])
        defer { held.terminate() }
        #expect(eventually { g.total(.tlsClientIdentities) == 2 && g.total(.activeConnections) == 1 })
        #expect(try echo("alice").status == 1)
        #expect(eventually { g.total(.userLimitRejections) == 1 })
        held.terminate()
        for who in ["mallory", "bob"] {
            let r = try echo(who)
            #expect(r.status == 1, "\(who) got through: \(r.line)")
        }
        let none = try TLSFixtures.client(["echo", "\(g.forward.port)", "50000"])
        #expect(none.status == 1, "no certificate got through: \(none.line)")
        let stranger = try echo("other")  // a valid certificate, CN=other.test: not a user
        #expect(stranger.status == 1, "a name not in the users file got through: \(stranger.line)")
        #expect(eventually {
            g.total(WorkerStatistics.tlsFailureCounter(.clientCertificate)) == 3 && g.total(.authFailures) == 2 && g.total(.activeConnections) == 0
        }, "client_certificate failures \(g.total(WorkerStatistics.tlsFailureCounter(.clientCertificate))), auth failures \(g.total(.authFailures))")
        #expect(g.total(.tlsClientIdentities) == 2)
    }

    @Test("interop with HAProxy both ways: igris upstream_tls into HAProxy `bind … ssl`, HAProxy `server … ssl verify required` into igris", arguments: engineBackends)
    func haproxyInterop(backend: BackendChoice) throws {
        // client → igris (plain in, upstream_tls) → HAProxy (ssl in, ssl out) → igris (tls in) → echo
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let combined = NSTemporaryDirectory() + "igris-haproxy-\(getpid()).pem"
        try (String(contentsOfFile: TLSFixtures.path("server.pem"), encoding: .utf8) + String(contentsOfFile: TLSFixtures.path("server.key"), encoding: .utf8))
            .write(toFile: combined, atomically: true, encoding: .utf8)
        defer { unlink(combined) }
        let haproxyPort = try unusedPort()
        var clientSettings = TLSClientSettings()
        clientSettings.ca = TLSFixtures.path("ca.pem")
        clientSettings.serverName = "localhost"
        let toHAProxy = UpstreamPool(name: "haproxy", servers: [try SocketAddress.resolve("127.0.0.1:\(haproxyPort)")], tls: try TLSClientContext(clientSettings))
        var inbound = ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: upstream.address, name: "tls-in")
        inbound.tls = try TLSFixtures.server()
        let configuration = ServerConfiguration(listeners: [
            ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), name: "plain-in", pool: toHAProxy), inbound,
        ], workers: 2, backend: backend)
        let server = try Server(configuration: configuration)
        try server.start()
        defer { server.beginDrain(); server.wait() }
        let config = try writeTemporaryFile("""
            global
                maxconn 100
            defaults
                mode tcp
                timeout connect 5s
                timeout client 20s
                timeout server 20s
            frontend tls_in
                bind 127.0.0.1:\(haproxyPort) ssl crt \(combined)
                default_backend to_igris
            backend to_igris
                server igris \(server.listenAddresses[1]) ssl verify required ca-file \(TLSFixtures.path("ca.pem")) sni str(localhost)

            """)
        defer { unlink(config) }
        let haproxy = try ChildProcess("/usr/sbin/haproxy", ["-f", config, "-db"])
        defer { haproxy.terminate() }
        if !waitUntilAccepting("127.0.0.1:\(haproxyPort)") {
            haproxy.signal(SIGTERM)
            Issue.record("haproxy did not start: \(haproxy.finish().stderr.replacingOccurrences(of: "\n", with: " | "))")
            return
        }
        let client = try TestSocket.connect(server.listenAddresses[0])
        client.setReceiveTimeout(seconds: 20)
        let count = 4 << 20
        let receiver = SharedBox<(received: Int, digest: [UInt8], error: Int32?)>((0, [], nil))
        let reader = TestThread { receiver.update { $0 = receiveDigest(client) } }
        let sent = sendPattern(client, seed: 77, count: count)
        client.shutdownWrite()
        reader.join()
        client.close()
        #expect(sent.sent == count)
        #expect(receiver.value.received == count && receiver.value.digest == sent.digest, "echo through HAProxy: \(receiver.value.received) bytes, error \(String(describing: receiver.value.error))")
        #expect(server.total(.tlsHandshakes) == 2)
        // Both of igris's TLS sessions went on without OpenSSL's SSL object: the one HAProxy
        // opened into igris, and igris's own upstream_tls session once HAProxy's ticket came.
        #expect(server.total(.tlsRecordsWithoutOpenSSL) == 2)
        #expect(eventually { server.total(.activeConnections) == 0 })
    }

    @Test("a tampered record mid-bridge resets that connection only; the other keeps flowing", arguments: engineBackends)
    func tamperedRecord(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let g = try TLSGateway(backend: backend, upstream: upstream.address, tls: try TLSFixtures.server())
        defer { g.stop() }
        // A TLS client over a plain socket, driven by IgrisTLS itself, so a record can be altered.
        let client = try ManualTLSClient(g.forward)
        let (session, socket) = (client.session, client.socket)
        var buffer = [UInt8](repeating: 0, count: 65536)
        let message = [UInt8](repeating: 0x42, count: 2000)
        _ = message.withUnsafeBytes { session.write($0.baseAddress!, count: $0.count) }
        var record = [UInt8](repeating: 0, count: 4096)
        let n = record.withUnsafeMutableBytes { session.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        record[n - 5] ^= 0x01
        #expect(socket.write(Array(record.prefix(n))))
        // The gateway resets it.
        while buffer.withUnsafeMutableBytes({ socket.read(into: $0) }) > 0 {}
        socket.close()
        #expect(eventually { g.total(.tlsRecordFailures) == 1 })
        let other = try TLSFixtures.client(["echo", "\(g.forward.port)", "200000"])
        #expect(other.status == 0, "\(other.line)")
        #expect(eventually { g.total(.activeConnections) == 0 })
        #expect(g.total(.tlsRecordsWithoutOpenSSL) + g.total(.tlsOffloaded) == 2)
    }

    @Test("configuration errors name key path and line: missing file, key not matching, expired certificate, CA that does not parse")
    func configurationErrors() throws {
        func error(_ tls: String) -> String {
            let yaml = """
                listeners:
                  - mode: forward
                    listen: 127.0.0.1:0
                    upstream: 127.0.0.1:9
                    tls:
                \(tls)
                """
            do { _ = try ConfigFile.parse(yaml, file: "igris.yaml"); return "" } catch { return error.description }
        }
        let dir = TLSFixtures.directory
        let missing = error("      certificate: /nonexistent.pem\n      key: \(dir)/server.key")
        #expect(missing.contains("igris.yaml:6: listeners[0].tls.certificate:") && missing.contains("/nonexistent.pem: No such file or directory"), "\(missing)")
        let mismatch = error("      certificate: \(dir)/server.pem\n      key: \(dir)/alice.key")
        #expect(mismatch.contains("igris.yaml:7: listeners[0].tls.key:") && mismatch.contains("does not match certificate"), "\(mismatch)")
        let expired = error("      certificate: \(dir)/expired.pem\n      key: \(dir)/expired.key")
        #expect(expired.contains("igris.yaml:6: listeners[0].tls.certificate:") && expired.contains("expired"), "\(expired)")
        let ca = error("      certificate: \(dir)/server.pem\n      key: \(dir)/server.key\n      client_ca: \(dir)/server.key")
        #expect(ca.contains("igris.yaml:8: listeners[0].tls.client_ca:") && ca.contains("does not parse"), "\(ca)")
        let small = try? ConfigFile.parse("buffer_size: 16384\nlisteners:\n  - mode: forward\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:9\n    tls: {certificate: \(dir)/server.pem, key: \(dir)/server.key}\n", file: "x")
        #expect(small == nil)
        // The flags: one line, non-zero exit.
        let half = try runCommand(productPath("igris"), ["serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--tls-cert", "\(dir)/server.pem"])
        #expect(half.status != 0 && half.stderr.contains("--tls-cert and --tls-key go together"), "\(half.stderr)")
        let wrong = try runCommand(productPath("igris"), ["serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
                                                          "--tls-cert", "\(dir)/server.pem", "--tls-key", "\(dir)/alice.key"])
        #expect(wrong.status != 0 && wrong.stderr.contains("does not match certificate"), "\(wrong.stderr)")
    }
}
