import Foundation
import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisOperations
import IgrisPolicy
import IgrisTLS
import Testing

/// Test certificates (Tests/fixtures/make-certs.sh), made once per test process.
enum TLSFixtures {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("fixtures").path
    static let directory: String = {
        let dir = NSTemporaryDirectory() + "igris-tls-\(getpid())"
        let (status, stderr) = try! runCommand("/bin/sh", [fixtures + "/make-certs.sh", dir])
        precondition(status == 0, "make-certs.sh: \(stderr)")
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
         handshakeTimeout: UInt64 = 10_000_000_000) throws {
        let options = GatewayOptions(requireAuthentication: false, handshakeTimeoutNanoseconds: handshakeTimeout)
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
