import Foundation
import Glibc
import IgrisEngine
import IgrisPolicy
import IgrisProtocols
import Testing

/// SOCKS5 and HTTP CONNECT listeners, end to end on loopback (the ACL denies loopback by
/// default, so every test that should get through allows its own server's port).
@Suite("Gateway (SOCKS5 / HTTP CONNECT)", .serialized)
struct GatewayTests {
    @Test("curl through SOCKS5 (remote and local DNS) and HTTP CONNECT fetches a file intact", arguments: engineBackends)
    func curlFetches(backend: BackendChoice) throws {
        let files = try FileServer()
        defer { files.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(files.port)"])
        defer { gateway.stop() }
        let url = "http://localhost:\(files.port)/blob"
        let viaSocksHostname = try curl(["--socks5-hostname", "\(gateway.socks5)", url])
        #expect(viaSocksHostname.status == 0, "\(viaSocksHostname.stderr)")
        #expect(viaSocksHostname.digest == files.digest)
        let viaSocks = try curl(["--socks5", "\(gateway.socks5)", "http://127.0.0.1:\(files.port)/blob"])
        #expect(viaSocks.status == 0 && viaSocks.digest == files.digest, "\(viaSocks.stderr)")
        let viaConnect = try curl(["-p", "-x", "http://\(gateway.http)", url])
        #expect(viaConnect.status == 0 && viaConnect.digest == files.digest, "\(viaConnect.stderr)")
        #expect(gateway.total(.handshakesCompleted) == 3)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("the default ACL denies loopback with the ruleset reply, for names and mapped addresses too", arguments: engineBackends)
    func defaultDeniesLoopback(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let gateway = try ProxyGateway(backend: backend)
        defer { gateway.stop() }
        let port = upstream.address.port
        let mapped: [UInt8] = [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF, 127, 0, 0, 1]
        for destination in [Socks5.Address.ipv4(127, 0, 0, 1), .domain("localhost"), .ipv6(mapped), .ipv6([UInt8](repeating: 0, count: 15) + [1]),
                            .ipv4(0, 0, 0, 0)] {
            let (s, reply) = try Socks5Client.connect(gateway.socks5, to: destination, port: port)
            #expect(reply == Socks5.Reply.notAllowedByRuleset.rawValue, "\(destination)")
            #expect(s.readOneByte() == 0, "closed after the reply")
            s.close()
        }
        let h = try TestSocket.connect(gateway.http)
        h.setReceiveTimeout(seconds: 10)
        h.write(Array("CONNECT 127.0.0.1:\(port) HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        let response = try readHTTPResponse(h)
        #expect(response.hasPrefix("HTTP/1.1 403 "), "\(response)")
        h.close()
        #expect(gateway.total(.aclDenied) == 6)
        #expect(upstream.accepted.value == 0, "nothing reached the upstream")
    }

    @Test("users: the right password gets through, a wrong one is refused and counted (SOCKS5 and HTTP)", arguments: engineBackends)
    func authentication(backend: BackendChoice) throws {
        let files = try FileServer(size: 200_000)
        defer { files.stop() }
        let users = UserDirectory(accounts: [UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("s3cret".utf8)))])
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(files.port)"], users: users)
        defer { gateway.stop() }
        let url = "http://127.0.0.1:\(files.port)/blob"
        let good = try curl(["-x", "socks5h://alice:s3cret@\(gateway.socks5)", url])
        #expect(good.status == 0 && good.digest == files.digest, "\(good.stderr)")
        let goodHTTP = try curl(["-p", "-x", "http://alice:s3cret@\(gateway.http)", url])
        #expect(goodHTTP.status == 0 && goodHTTP.digest == files.digest, "\(goodHTTP.stderr)")

        let bad = try curl(["-x", "socks5h://alice:wrong@\(gateway.socks5)", url])
        #expect(bad.status == 97, "curl: proxy handshake failed: \(bad.stderr)")
        #expect(bad.stderr.lowercased().contains("rejected") || bad.stderr.lowercased().contains("authentication"), "\(bad.stderr)")
        let badHTTP = try curl(["-p", "-x", "http://alice:wrong@\(gateway.http)", url])
        #expect(badHTTP.status == 56 && badHTTP.stderr.contains("407"), "\(badHTTP.stderr)")
        let anonymous = try curl(["--socks5-hostname", "\(gateway.socks5)", url])
        #expect(anonymous.status == 97, "no acceptable method: \(anonymous.stderr)")
        let anonymousHTTP = try curl(["-p", "-x", "http://\(gateway.http)", url])
        #expect(anonymousHTTP.status == 56 && anonymousHTTP.stderr.contains("407"), "\(anonymousHTTP.stderr)")
        #expect(gateway.total(.authFailures) == 2)
        #expect(gateway.policy.authenticator!.rejectedCount == 2)
        #expect(users.accounts[0].connectionsTotal == 2)
        #expect(users.accounts[0].bytesToClient > 400_000)
    }

    @Test("per-user max_connections: the next connection gets 0x02 until one closes", arguments: engineBackends)
    func userConnectionLimit(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let alice = UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("pw".utf8)), maxConnections: 2)
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(upstream.address.port)"],
                                       users: UserDirectory(accounts: [alice]))
        defer { gateway.stop() }
        let port = upstream.address.port
        var open: [TestSocket] = []
        for i in 0..<2 {
            let (s, reply) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: port, credentials: ("alice", "pw"))
            #expect(reply == 0)
            s.write([UInt8(i)])
            #expect(try s.readExactly(1) == [UInt8(i)])
            open.append(s)
        }
        let (third, reply) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: port, credentials: ("alice", "pw"))
        #expect(reply == Socks5.Reply.notAllowedByRuleset.rawValue)
        third.close()
        #expect(gateway.total(.userLimitRejections) == 1)
        open.removeFirst().close()
        #expect(gateway.eventually { alice.activeConnections == 1 })
        let (again, replyAgain) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: port, credentials: ("alice", "pw"))
        #expect(replyAgain == 0)
        again.close()
        for s in open { s.close() }
        #expect(gateway.eventually { alice.activeConnections == 0 && gateway.total(.activeConnections) == 0 })
    }

    @Test("bandwidth limits hold within ±15% over 3 s, each direction", arguments: engineBackends)
    func bandwidthLimit(backend: BackendChoice) throws {
        let uploadRate = 3_000_000.0
        let downloadRate = 2_000_000.0
        let window = 3.0
        let measured = SharedBox<[String: Double]>([:])
        // The upstream measures what arrives on upload connections and sends on download ones.
        let upstream = try TestUpstream { socket in
            var mode: UInt8 = 0
            guard withUnsafeMutableBytes(of: &mode, { socket.read(into: $0) }) == 1 else { socket.close(); return }
            if mode == UInt8(ascii: "U") {
                let rate = receiveRate(socket, window: window)
                measured.update { $0["upload"] = rate }
            } else {
                blast(socket)
            }
        }
        defer { upstream.stop() }
        let limited = UserAccount(name: "slow", passwordHash: try PasswordHasher.hash(Array("pw".utf8)),
                                  uploadBytesPerSecond: UInt64(uploadRate), downloadBytesPerSecond: UInt64(downloadRate))
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(upstream.address.port)"],
                                       users: UserDirectory(accounts: [limited]))
        defer { gateway.stop() }
        let port = upstream.address.port
        let (up, r1) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: port, credentials: ("slow", "pw"))
        let (down, r2) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: port, credentials: ("slow", "pw"))
        #expect(r1 == 0 && r2 == 0)
        up.write(Array("U".utf8))
        down.write(Array("D".utf8))
        let uploader = TestThread { blast(up) }
        let downloadRateMeasured = receiveRate(down, window: window)
        uploader.join()
        #expect(gateway.eventually { measured.value["upload"] != nil })
        let uploadMeasured = try #require(measured.value["upload"])
        print("bandwidth limit (\(backend)): upload \(Int(uploadMeasured)) B/s of \(Int(uploadRate)), download \(Int(downloadRateMeasured)) B/s of \(Int(downloadRate))")
        #expect(abs(uploadMeasured - uploadRate) / uploadRate <= 0.15, "upload \(uploadMeasured) B/s vs limit \(uploadRate)")
        #expect(abs(downloadRateMeasured - downloadRate) / downloadRate <= 0.15, "download \(downloadRateMeasured) B/s vs limit \(downloadRate)")
        #expect(gateway.total(.throttlePauses) > 0)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("malformed, truncated and unsupported handshakes get their reply and close; another client keeps being served",
          arguments: engineBackends)
    func malformedHandshakes(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(upstream.address.port)"])
        defer { gateway.stop() }
        let (good, reply) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: upstream.address.port)
        #expect(reply == 0)
        var round = 0
        func goodStillServed() throws {
            round += 1
            let bytes = [UInt8](repeating: UInt8(round & 0xFF), count: 1000)
            good.write(bytes)
            #expect(try good.readExactly(1000) == bytes)
        }
        let socksCases: [(String, [UInt8], [UInt8])] = [
            ("SOCKS4 greeting", [4, 1, 0, 80, 127, 0, 0, 1, 0], [5, 0xFF]),
            ("greeting without methods", [5, 0], [5, 0xFF]),
            ("greeting offering only GSSAPI", [5, 1, 1], [5, 0xFF]),
            ("BIND", [5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80], [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]),
            ("unknown command", [5, 1, 0, 5, 9, 0, 1, 127, 0, 0, 1, 0, 80], [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]),
            ("unknown address type", [5, 1, 0, 5, 1, 0, 9, 1, 2, 3], [5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0]),
            ("empty domain", [5, 1, 0, 5, 1, 0, 3, 0, 0, 80], [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]),
            ("domain with control bytes", [5, 1, 0, 5, 1, 0, 3, 3, 97, 10, 98, 0, 80], [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]),
            ("bad request version", [5, 1, 0, 4, 1, 0, 1], [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]),
            ("truncated request, then EOF", [5, 1, 0, 5, 1, 0, 3, 50, 97, 98], [5, 0]),
        ]
        for (name, bytes, expected) in socksCases {
            let s = try TestSocket.connect(gateway.socks5)
            s.setReceiveTimeout(seconds: 10)
            s.write(bytes)
            if name.hasSuffix("EOF") { s.shutdownWrite() }
            #expect(try s.readExactly(expected.count) == expected, "\(name)")
            #expect(s.readOneByte() == 0, "\(name): closed after the reply")
            s.close()
            try goodStillServed()
        }
        let httpCases: [(String, String, String)] = [
            ("GET origin-form", "GET /index.html HTTP/1.1\r\nHost: example.org\r\n\r\n", "HTTP/1.1 405 "),
            ("https target", "GET https://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n", "HTTP/1.1 400 "),
            ("garbage", "\u{1}\u{2}\u{3} nonsense\r\n\r\n", "HTTP/1.1 400 "),
            ("no port", "CONNECT example.org HTTP/1.1\r\n\r\n", "HTTP/1.1 400 "),
            ("oversize head", "CONNECT a:1 HTTP/1.1\r\n" + String(repeating: "X-Pad: 0123456789\r\n", count: 600), "HTTP/1.1 400 "),
        ]
        for (name, text, expected) in httpCases {
            let s = try TestSocket.connect(gateway.http)
            s.setReceiveTimeout(seconds: 10)
            s.write(Array(text.utf8))
            let response = try readHTTPResponse(s)
            #expect(response.hasPrefix(expected), "\(name): \(response)")
            #expect(s.readOneByte() == 0, "\(name): closed after the reply")
            s.close()
            try goodStillServed()
        }
        #expect(gateway.total(.handshakeFailures) == Int64(socksCases.count - 1 + httpCases.count))
        good.close()
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("a handshake that stalls is closed at its timeout", arguments: engineBackends)
    func handshakeTimeout(backend: BackendChoice) throws {
        let gateway = try ProxyGateway(backend: backend, handshakeTimeout: 300_000_000)
        defer { gateway.stop() }
        let silent = try TestSocket.connect(gateway.socks5)
        let partial = try TestSocket.connect(gateway.socks5)
        let partialHTTP = try TestSocket.connect(gateway.http)
        partial.write([5, 1, 0, 5, 1])
        partialHTTP.write(Array("CONNECT a:1 HTTP/1.1\r\n".utf8))
        for s in [silent, partial, partialHTTP] { s.setReceiveTimeout(seconds: 10) }
        #expect(silent.readOneByte() == 0)
        #expect(try partial.readExactly(2) == [5, 0])
        #expect(partial.readOneByte() == 0)
        #expect(partialHTTP.readOneByte() == 0)
        for s in [silent, partial, partialHTTP] { s.close() }
        #expect(gateway.total(.handshakeTimeouts) == 3)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("pipelined greeting, request and data in one write; half-close carries through", arguments: engineBackends)
    func pipelined(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(upstream.address.port)"])
        defer { gateway.stop() }
        let s = try TestSocket.connect(gateway.socks5)
        s.setReceiveTimeout(seconds: 10)
        let payload = [UInt8](repeating: 0x5A, count: 100_000)
        s.write([5, 1, 0] + Socks5Client.request(.ipv4(127, 0, 0, 1), port: upstream.address.port) + payload)
        s.shutdownWrite()
        #expect(try s.readExactly(2) == [5, 0])
        #expect(try Socks5Client.readReply(s) == 0)
        #expect(try s.readExactly(payload.count) == payload)
        #expect(s.readOneByte() == 0, "the upstream's FIN comes through after the echo")
        s.close()

        // The same through HTTP CONNECT.
        let h = try TestSocket.connect(gateway.http)
        h.setReceiveTimeout(seconds: 10)
        h.write(Array("CONNECT 127.0.0.1:\(upstream.address.port) HTTP/1.1\r\n\r\n".utf8) + payload)
        h.shutdownWrite()
        #expect(try readHTTPResponse(h).hasPrefix("HTTP/1.1 200 "))
        #expect(try h.readExactly(payload.count) == payload)
        #expect(h.readOneByte() == 0)
        h.close()
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("connection churn: 8 clients × 150 SOCKS5/HTTP CONNECT connects, each verified by an echo", arguments: engineBackends)
    func churn(backend: BackendChoice) throws {
        // Regression: the connect address once lived on the stack while io_uring submitted
        // the connect a loop turn later; under concurrency some connects went astray (RST).
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(upstream.address.port)"])
        defer { gateway.stop() }
        let failures = SharedCounter()
        let successes = SharedCounter()
        let port = upstream.address.port
        let socks = gateway.socks5
        let http = gateway.http
        let threads = (0..<8).map { t in
            TestThread {
                for i in 0..<150 {
                    do {
                        let s: TestSocket
                        if (t + i) % 2 == 0 {
                            let (c, reply) = try Socks5Client.connect(socks, to: .ipv4(127, 0, 0, 1), port: port)
                            guard reply == 0 else { c.close(); failures.add(1); continue }
                            s = c
                        } else {
                            s = try TestSocket.connect(http)
                            s.setReceiveTimeout(seconds: 10)
                            s.write(Array("CONNECT 127.0.0.1:\(port) HTTP/1.1\r\n\r\n".utf8))
                            guard try readHTTPResponse(s).hasPrefix("HTTP/1.1 200 ") else { s.close(); failures.add(1); continue }
                        }
                        let probe: [UInt8] = [UInt8(t), UInt8(i & 0xFF)]
                        s.write(probe)
                        if (try? s.readExactly(2)) == probe { successes.add(1) } else { failures.add(1) }
                        s.close()
                    } catch {
                        failures.add(1)
                    }
                }
            }
        }
        for t in threads { t.join() }
        #expect(failures.value == 0)
        #expect(successes.value == 8 * 150)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("IPv6 destinations; refused and timed-out connects get their reply codes", arguments: engineBackends)
    func connectOutcomes(backend: BackendChoice) throws {
        let (v6fd, v6address) = try listeningSocket("[::1]:0", backlog: 16)
        defer { Glibc.close(v6fd) }
        // A listener that never accepts, its queue full: further SYNs are dropped, so a
        // connect to it hangs until the gateway's connect timeout.
        let (fullFD, fullAddress) = try listeningSocket("127.0.0.1:0", backlog: 0)
        defer { Glibc.close(fullFD) }
        var fillers: [Int32] = []
        defer { for f in fillers { Glibc.close(f) } }
        for _ in 0..<4 {
            let f = try Syscall.streamSocket(family: AF_INET)
            _ = fullAddress.withSockAddr { Glibc.connect(f, $0, $1) }
            fillers.append(f)
        }
        let refusedPort = try unusedPort()
        let gateway = try ProxyGateway(backend: backend, allow: ["::1/128", "127.0.0.1/32"]) {
            $0.connectTimeoutNanoseconds = 500_000_000
        }
        defer { gateway.stop() }
        let (v6, ok) = try Socks5Client.connect(gateway.socks5, to: .ipv6([UInt8](repeating: 0, count: 15) + [1]), port: v6address.port)
        #expect(ok == 0)
        let accepted = Glibc.accept(v6fd, nil, nil)
        #expect(accepted >= 0)
        let peer = TestSocket(fd: accepted)
        v6.write([1, 2, 3])
        #expect(try peer.readExactly(3) == [1, 2, 3])
        peer.close()
        v6.close()
        let (refused, r) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: refusedPort)
        #expect(r == Socks5.Reply.connectionRefused.rawValue)
        refused.close()
        let (slow, t) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: fullAddress.port)
        #expect(t == Socks5.Reply.ttlExpired.rawValue)
        slow.close()
        for (port, status) in [(refusedPort, "502"), (fullAddress.port, "504")] {
            let h = try TestSocket.connect(gateway.http)
            h.setReceiveTimeout(seconds: 10)
            h.write(Array("CONNECT 127.0.0.1:\(port) HTTP/1.1\r\n\r\n".utf8))
            let response = try readHTTPResponse(h)
            #expect(response.hasPrefix("HTTP/1.1 \(status) "), "\(response)")
            h.close()
        }
        #expect(gateway.total(.connectTimeouts) == 2)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }
}

/// Reads a response head (up to the empty line) and returns it as text.
func readHTTPResponse(_ s: TestSocket) throws -> String {
    var bytes: [UInt8] = []
    while !(bytes.count >= 4 && Array(bytes.suffix(4)) == [13, 10, 13, 10]) {
        bytes += try s.readExactly(1)
        if bytes.count > 16384 { throw TestFailure("response head too long") }
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// Writes 64 KiB chunks until the peer goes away (bounded at 15 s).
func blast(_ socket: TestSocket) {
    socket.setSendTimeout(seconds: 15)
    let chunk = [UInt8](repeating: 0xA5, count: 65536)
    let deadline = Date().addingTimeInterval(15)
    while Date() < deadline && socket.write(chunk) {}
    socket.close()
}

/// Bytes per second received over `window` seconds from the first byte; then resets the
/// connection so the sender stops.
func receiveRate(_ socket: TestSocket, window: Double) -> Double {
    var buffer = [UInt8](repeating: 0, count: 65536)
    var total = 0
    var start: Date?
    socket.setReceiveTimeout(seconds: 1)
    while true {
        let n = buffer.withUnsafeMutableBytes { socket.read(into: $0) }
        if n <= 0 { break }
        let now = Date()
        if start == nil { start = now }
        if now.timeIntervalSince(start!) >= window { break }
        total += n
    }
    socket.reset()
    return Double(total) / window
}
