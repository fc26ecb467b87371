import Foundation
import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisOperations
import IgrisPolicy
import IgrisProtocols
import Testing

@Suite("Configuration file", .serialized)
struct ConfigTests {
    let igris = productPath("igris")

    static let valid = """
        workers: 2
        backend: auto
        connect_timeout: 3s
        idle_timeout: 10m
        acl:
          allow: ["127.0.0.1/32:8000"]
          deny: ["10.0.0.0/8"]
        log:
          level: warning
        listeners:
          - name: web
            listen: 127.0.0.1:0
            mode: forward
            upstream: 127.0.0.1:9
          - name: socks
            listen: 127.0.0.1:0
            mode: socks5
            auth: none
          - name: admin
            listen: 127.0.0.1:0
            mode: admin
        """

    @Test("pools: servers, balance, health checks, PROXY; a forward listener uses one by name")
    func pools() throws {
        let c = try ConfigFile.parse("""
            pools:
              app:
                servers: ["127.0.0.1:9001", "[::1]:9002"]
                balance: least_conn
                health_check: {interval: 2s, timeout: 500ms, rise: 3, fall: 2}
                send_proxy_protocol: v2
                source: [127.0.0.2, "::1"]
            listeners:
              - {name: web, listen: "127.0.0.1:0", mode: forward, pool: app}
            """, file: "p.yaml")
        let pool = try #require(c.pools["app"])
        #expect(pool.servers.map(\.description) == ["127.0.0.1:9001", "[::1]:9002"])
        #expect(pool.balance == .leastConn && pool.sendProxyProtocol == .v2)
        #expect(pool.sources == [try SocketAddress.resolve("127.0.0.2:0"), try SocketAddress.resolve("[::1]:0")])
        #expect(pool.healthCheck == HealthCheck(intervalNanoseconds: 2_000_000_000, timeoutNanoseconds: 500_000_000, rise: 3, fall: 2))
        let server = try c.serverConfiguration(gateway: IgrisNegotiation.Gateway(policy: try c.policy(configPath: "p.yaml")))
        #expect(server.listeners[0].pool === pool)
    }

    @Test("listener overrides: splice, timeouts, max_connections")
    func listenerOverrides() throws {
        let c = try ConfigFile.parse("""
            idle_timeout: 10m
            listeners:
              - {name: a, listen: "127.0.0.1:0", mode: forward, upstream: "127.0.0.1:9", splice: never, connect_timeout: 2s, idle_timeout: none, max_connections: 10}
              - {name: b, listen: "127.0.0.1:0", mode: socks5, auth: none, handshake_timeout: 3s, idle_timeout: 1h}
            """, file: "o.yaml")
        let rules = try c.listenerRules(gateway: IgrisNegotiation.Gateway(policy: try c.policy(configPath: "o.yaml")))
        #expect(rules[0].splice == .never && rules[0].connectTimeoutNanoseconds == 2_000_000_000 && rules[0].maxConnections == 10)
        #expect(rules[0].idleTimeoutNanoseconds == .some(nil), "none overrides the global idle timeout")
        #expect(rules[1].idleTimeoutNanoseconds == .some(3_600_000_000_000))
        #expect(rules[1].modeName == "socks5")
        #expect(rules[1].negotiator?.timeoutNanoseconds == 3_000_000_000)
        #expect(throws: YAMLFileError.self) {
            _ = try ConfigFile.parse("listeners:\n  - {listen: \"127.0.0.1:0\", mode: admin, splice: never}\n", file: "x.yaml")
        }
    }

    @Test("a valid file becomes listeners, timeouts and ACL rules")
    func parsesValid() throws {
        let c = try ConfigFile.parse(Self.valid, file: "igris.yaml")
        #expect(c.listeners.map(\.name) == ["web", "socks", "admin"])
        #expect(c.listeners.map(\.mode) == [.forward, .socks5, .admin])
        #expect(c.listeners[1].requireAuthentication == false)
        #expect(c.connectTimeoutNanoseconds == 3_000_000_000 && c.idleTimeoutNanoseconds == 600_000_000_000)
        #expect(c.aclRules.map(\.description) == ["deny 10.0.0.0/8", "allow 127.0.0.1/32:8000"])
        let server = try c.serverConfiguration(gateway: IgrisNegotiation.Gateway(policy: try c.policy(configPath: "igris.yaml")))
        #expect(server.listeners.count == 2, "admin listeners are not engine listeners")
        #expect(server.workers == 2)
    }

    @Test("source limits: defaults from max_connections, each key overrides its own, 0 turns one off")
    func sourceLimits() throws {
        func settings(_ extra: String) throws -> SourceLimits.Settings {
            let c = try ConfigFile.parse("max_connections: 1000\n\(extra)listeners:\n  - {listen: \"127.0.0.1:0\", mode: forward, upstream: \"127.0.0.1:9\"}\n",
                                         file: "s.yaml")
            return try c.serverConfiguration(gateway: IgrisNegotiation.Gateway(policy: try c.policy(configPath: "s.yaml"))).sourceLimits
        }
        #expect(try settings("") == SourceLimits.Settings(maxConnectionsPerSource: 250, maxHandshakes: 500, maxHandshakesPerSource: 64))
        #expect(try settings("max_connections_per_source: 0\nmax_handshakes_per_source: 8\n")
                == SourceLimits.Settings(maxConnectionsPerSource: 0, maxHandshakes: 500, maxHandshakesPerSource: 8))
        #expect(try settings("max_handshakes: 0\n").maxHandshakes == 0)
        // direct_descriptors (io_uring here): the default max_connections counts table entries, not descriptors.
        let direct = try ConfigFile.parse("direct_descriptors: true\nbackend: io_uring\nworkers: 2\nlisteners:\n  - {listen: \"127.0.0.1:0\", mode: forward, upstream: \"127.0.0.1:9\"}\n",
                                          file: "d.yaml")
        let directConfiguration = try direct.serverConfiguration(gateway: IgrisNegotiation.Gateway(policy: try direct.policy(configPath: "d.yaml")))
        #expect(directConfiguration.directDescriptors)
        #expect(directConfiguration.busyPollNanoseconds == 0)
        let polling = try ConfigFile.parse("busy_poll: 50us\nlisteners:\n  - {listen: \"127.0.0.1:0\", mode: forward, upstream: \"127.0.0.1:9\"}\n", file: "b.yaml")
        #expect(try polling.serverConfiguration(gateway: IgrisNegotiation.Gateway(policy: try polling.policy(configPath: "b.yaml"))).busyPollNanoseconds == 50_000)
        #expect(directConfiguration.maxConnections == Server.defaultMaxConnections(workers: 2, listeners: 1, direct: true))
        #expect(directConfiguration.maxConnections > Server.defaultMaxConnections(workers: 2, listeners: 1))
        #expect(try ConfigFile.parse("udp_relay_ports: 40000-40999\nlisteners:\n  - {listen: \"127.0.0.1:0\", mode: socks5, auth: none}\n", file: "u.yaml").udpRelayPorts == 40000...40999)
        #expect(PortRange.parse("53") == 53...53 && PortRange.parse("9-1") == nil && PortRange.parse("0-9") == nil && PortRange.parse("1-70000") == nil)
        do {
            _ = try settings("max_handshakes: -1\n")
            Issue.record("a negative limit was accepted")
        } catch {
            #expect("\(error)".contains("s.yaml:2: max_handshakes: must be 0 (no limit) or more"), "\(error)")
        }
    }

    @Test("every error names its key path and line; unknown keys are errors")
    func errors() {
        func error(_ text: String) -> String {
            do { _ = try ConfigFile.parse(text, file: "c.yaml"); return "no error" } catch { return error.description }
        }
        let cases: [(String, String)] = [
            ("listeners:\n  - listen: 127.0.0.1:1\n    mode: socks5\n    splise: always\n", "c.yaml:4: listeners[0].splise: unknown key 'splise'"),
            ("listeners:\n  - listen: 127.0.0.1\n    mode: socks5\n", "c.yaml:2: listeners[0].listen: malformed address '127.0.0.1'"),
            ("listeners:\n  - listen: 127.0.0.1:1\n    mode: tunnel\n", "c.yaml:3: listeners[0].mode: expected one of forward, socks5, http_connect, admin"),
            ("listeners:\n  - listen: 127.0.0.1:1\n    mode: forward\n", "listeners[0].upstream: required key 'upstream' is missing"),
            ("listeners:\n  - listen: 127.0.0.1:1\n    mode: socks5\n    upstream: 127.0.0.1:2\n", "c.yaml:4: listeners[0].upstream: only forward listeners"),
            ("workers: 0\nlisteners: []\n", "c.yaml:1: workers: must be between 1 and 1024"),
            ("direct_descriptors: sometimes\nlisteners: []\n", "c.yaml:1: direct_descriptors"),
            ("listen_backlog: 0\nlisteners: []\n", "c.yaml:1: listen_backlog: must be between 1 and 65535"),
            ("busy_poll: 2s\nlisteners: []\n", "c.yaml:1: busy_poll: must be at most 1s"),
            ("busy_poll: eager\nlisteners: []\n", "c.yaml:1: busy_poll: expected a duration"),
            ("connect_timeout: soon\nlisteners: []\n", "c.yaml:1: connect_timeout: expected a duration"),
            ("acl:\n  allow: [\"127.0.0.1:80\"]\nlisteners: []\n", "c.yaml:2: acl.allow[0]: bad ACL rule '127.0.0.1:80'"),
            ("listeners: []\n", "c.yaml:1: listeners: at least one listener is needed"),
            ("workers: 2\n", "required key 'listeners' is missing"),
            ("listeners:\n  - {name: a, listen: 127.0.0.1:1, mode: admin}\n  - {name: a, listen: 127.0.0.1:2, mode: admin}\n", "listeners[1].name: duplicate listener name 'a'"),
            ("listeners: [\n", "c.yaml: not valid YAML"),
            ("pools:\n  app:\n    servers: [\"127.0.0.1:1\"]\n    balance: random\nlisteners: []\n", "c.yaml:4: pools.app.balance: expected one of round_robin, least_conn, source_hash"),
            ("pools:\n  app:\n    servers: []\nlisteners: []\n", "c.yaml:3: pools.app.servers: a pool has 1 to 64 servers"),
            ("pools:\n  app:\n    servers: [\"127.0.0.1:1\"]\n    health_check: {interval: 1s, timeout: 2s}\nlisteners: []\n", "pools.app.health_check.timeout: must not exceed the interval"),
            ("listeners:\n  - listen: 127.0.0.1:1\n    mode: forward\n    pool: nope\n", "c.yaml:4: listeners[0].pool: no pool named 'nope'"),
            ("listeners:\n  - listen: 127.0.0.1:1\n    mode: forward\n    upstream: 127.0.0.1:2\n    source: [127.0.0.2, 192.0.2.1]\n",
             "c.yaml:5: listeners[0].source[1]: 192.0.2.1 is not an address of this host"),
            ("listeners:\n  - listen: 127.0.0.1:1\n    mode: socks5\n    source: [127.0.0.2]\n", "c.yaml:4: listeners[0].source: only forward listeners with an upstream"),
            ("pools:\n  app:\n    servers: [\"127.0.0.1:1\"]\n    source: [host]\nlisteners: []\n", "c.yaml:4: pools.app.source[0]: expected an IP address"),
        ]
        for (text, expected) in cases {
            let e = error(text)
            #expect(e.contains(expected), "\(text) → \(e)")
        }
    }

    @Test("igris check: ok on a valid file, one line with the location and exit 1 on a bad one")
    func checkCommand() throws {
        let good = try writeTemporaryFile(Self.valid)
        defer { unlink(good) }
        let ok = try ChildProcess(igris, ["check", "-c", good])
        let line = ok.readLine()
        #expect(ok.finish().status == 0)
        #expect(line.contains("ok — 3 listeners"), "\(line)")
        let bad = try writeTemporaryFile("listeners:\n  - listen: 127.0.0.1:1\n    mode: socks5\n    bogus: 1\n")
        defer { unlink(bad) }
        let result = try runCommand(igris, ["check", "-c", bad])
        #expect(result.status == 1)
        #expect(result.stderr == "igris: \(bad):4: listeners[0].bogus: unknown key 'bogus' (expected one of: accept_proxy_protocol, auth, connect_timeout, dead_peer_timeout, handshake_timeout, idle_timeout, listen, max_connections, mode, name, pool, proxy_protocol_from, send_proxy_protocol, source, splice, tls, upstream, upstream_tls)\n")
        let needsUsers = try writeTemporaryFile("listeners:\n  - listen: 127.0.0.1:1\n    mode: socks5\n")
        defer { unlink(needsUsers) }
        let missing = try runCommand(igris, ["check", "-c", needsUsers])
        #expect(missing.status == 1 && missing.stderr.contains("users_file is required"), "\(missing.stderr)")
        // A file that can't be read says why.
        let absent = try runCommand(igris, ["check", "-c", "/nonexistent/igris.yaml"])
        #expect(absent.status != 0 && absent.stderr.contains("cannot read the configuration file: No such file or directory"), "\(absent.stderr)")
    }
}

@Suite("Escaping in logs and metrics")
struct EscapingTests {
    @Test("CR, LF and CRLF never reach a log line or a label value unescaped", arguments: [
        ("eve\r\nforged=1", "\"eve\\r\\nforged=1\""),
        ("eve\rx", "\"eve\\rx\""),
        ("eve\nx", "\"eve\\nx\""),
        ("a\"b\\c", "\"a\\\"b\\\\c\""),
        ("plain", "plain"),
    ])
    func escapes(value: String, quoted: String) {
        #expect(LogfmtLogHandler.quote(value) == quoted)
        let label = MetricsText.escape(value)
        #expect(!label.unicodeScalars.contains("\r") && !label.unicodeScalars.contains("\n"), "\(label.debugDescription)")
    }
}

@Suite("Admin endpoint", .serialized)
struct AdminTests {
    /// GET over a plain socket; returns status line and body.
    static func get(_ address: SocketAddress, _ path: String, method: String = "GET") throws -> (status: String, body: String) {
        let s = try TestSocket.connect(address)
        s.setReceiveTimeout(seconds: 10)
        s.write(Array("\(method) \(path) HTTP/1.1\r\nHost: igris\r\n\r\n".utf8))
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { s.read(into: $0) }
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        s.close()
        let text = String(decoding: bytes, as: UTF8.self)
        let parts = text.components(separatedBy: "\r\n\r\n")
        return (parts[0].components(separatedBy: "\r\n")[0], parts.dropFirst().joined(separator: "\r\n\r\n"))
    }

    @Test("16 clients dripping a request head byte by byte can't hold /healthz shut; each is closed at the head deadline")
    func drippers() throws {
        let adminPort = try unusedPort()
        let child = try ChildProcess(productPath("igris"), ["serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
                                                            "--admin", "127.0.0.1:\(adminPort)", "--workers", "1"])
        defer { child.terminate() }
        let log = LogLines(child)
        #expect(log.wait(for: "forwarding"))
        let admin = try SocketAddress.resolve("127.0.0.1:\(adminPort)")
        // From two other loopback addresses, 8 each (the per-source cap), a byte a second: never
        // silent for the old per-read timeout, never done.
        let closedByServer = SharedCounter()
        let drippers = (0..<16).map { k in
            TestThread {
                guard let fd = try? Syscall.streamSocket(family: AF_INET, nonBlocking: false) else { return }
                let s = TestSocket(fd: fd)
                defer { s.close() }
                guard (try? Syscall.bind(fd, try SocketAddress.resolve("127.0.0.\(2 + k % 2):0"))) != nil,
                      admin.withSockAddr({ Glibc.connect(fd, $0, $1) }) == 0 else { return }
                s.setReceiveTimeout(seconds: 1)
                for byte in Array("GET /metrics HTTP/1.1\r\nX: ".utf8) {
                    _ = s.write([byte])
                    var b: UInt8 = 0
                    // Waits up to 1 s for the server's answer: EOF means it gave up on us.
                    if Glibc.recv(fd, &b, 1, 0) == 0 {
                        closedByServer.add(1)
                        return
                    }
                }
            }
        }
        // While they drip, /healthz answers every time.
        for _ in 0..<4 {
            usleep(1_000_000)  // spread the checks over the drip, as a balancer's would be
            #expect(try AdminTests.get(admin, "/healthz").status == "HTTP/1.1 200 OK")
        }
        for t in drippers { t.join() }
        #expect(closedByServer.value == 16, "drippers closed at the head deadline: \(closedByServer.value) of 16")
        child.signal(SIGTERM)
        #expect(child.finish().status == 0)
    }

    @Test("/metrics counts a known workload and passes promtool; /healthz; /readyz turns 503 while draining", arguments: engineBackends)
    func metricsAndReadiness(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let alice = UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("pw".utf8)))
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(upstream.address.port)"],
                                       users: UserDirectory(accounts: [alice]))
        var stopped = false
        defer { if !stopped { gateway.stop() } }
        let admin = try AdminServer(listen: try SocketAddress.resolve("127.0.0.1:0"),
                                    metrics: MetricsRenderer(server: gateway.server))
        admin.start()
        defer { admin.stop() }

        // Known workload: 3 SOCKS5 bridges each echoing 1000 bytes, one wrong password.
        for _ in 0..<3 {
            let (s, reply) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: upstream.address.port, credentials: ("alice", "pw"))
            #expect(reply == 0)
            s.write([UInt8](repeating: 7, count: 1000))
            _ = try s.readExactly(1000)
            s.close()
        }
        #expect(throws: TestFailure.self) {
            _ = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: upstream.address.port, credentials: ("alice", "nope"))
        }
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })

        let (status, metrics) = try Self.get(admin.address, "/metrics")
        #expect(status == "HTTP/1.1 200 OK")
        for expected in ["igris_connections_total{listener=\"socks\"} 4", "igris_connections_active{listener=\"socks\"} 0",
                         "igris_bytes_total{direction=\"client_to_upstream\",listener=\"socks\"} 3000",
                         "igris_bytes_total{direction=\"upstream_to_client\",listener=\"socks\"} 3000",
                         "igris_auth_failures_total 1", "igris_handshakes_total 3",
                         "igris_user_connections_total{user=\"alice\"} 3",
                         "igris_user_bytes_total{direction=\"client_to_upstream\",user=\"alice\"} 3000",
                         "igris_upstream_connect_duration_seconds_count 3", "igris_upstream_connect_duration_seconds_bucket{le=\"+Inf\"} 3",
                         "igris_build_info{backend=\"\(backend == .ioUring ? "io_uring" : "epoll")\",version=\"0.1.0\"} 1"] {
            #expect(metrics.contains(expected + "\n"), "missing: \(expected)")
        }
        // Every worker's CPU, as /proc counts it for its thread.
        for w in 0..<2 { #expect(metrics.contains("igris_worker_cpu_seconds_total{worker=\"\(w)\"} "), "worker \(w)'s CPU") }
        // promtool (Debian's prometheus package) validates the exposition format and naming.
        let file = try writeTemporaryFile(metrics)
        defer { unlink(file) }
        // `make test` unpacks promtool into .build/tools/bin.
        let promtool = try runShell("PATH=\"\(DeployTests.root)/.build/tools/bin:$PATH\" promtool check metrics < \(file)")
        #expect(promtool.2.contains("not found") == false, "promtool is missing: run `make test`, which fetches it")
        #expect(promtool.0 == 0, "promtool: \(promtool.1) \(promtool.2)")

        #expect(try Self.get(admin.address, "/healthz") == ("HTTP/1.1 200 OK", "ok\n"))
        #expect(try Self.get(admin.address, "/readyz") == ("HTTP/1.1 200 OK", "ready\n"))
        #expect(try Self.get(admin.address, "/nope").status == "HTTP/1.1 404 Not Found")
        #expect(try Self.get(admin.address, "/metrics", method: "POST").status == "HTTP/1.1 405 Method Not Allowed")
        let garbage = try TestSocket.connect(admin.address)
        garbage.setReceiveTimeout(seconds: 10)
        garbage.write(Array("\u{1}\u{2} nonsense\r\n\r\n".utf8))
        #expect(try readHTTPResponse(garbage).hasPrefix("HTTP/1.1 400 "))
        garbage.close()

        // Drain with a bridge open: readyz fails, the bridge still works, then it closes and the
        // workers exit.
        let (open, r) = try Socks5Client.connect(gateway.socks5, to: .ipv4(127, 0, 0, 1), port: upstream.address.port, credentials: ("alice", "pw"))
        #expect(r == 0)
        gateway.server.beginDrain()
        #expect(try Self.get(admin.address, "/readyz") == ("HTTP/1.1 503 Service Unavailable", "draining\n"))
        open.write([1, 2, 3])
        #expect(try open.readExactly(3) == [1, 2, 3])
        open.close()
        gateway.server.wait()
        stopped = true
    }
}

@Suite("igris serve -c", .serialized)
struct ServeConfigTests {
    @Test("a file with forward, socks5 and admin listeners serves all three; one access log line per closed connection",
          arguments: engineBackends)
    func servesFromFile(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let (forwardPort, socksPort, adminPort) = (try unusedPort(), try unusedPort(), try unusedPort())
        let users = try writeTemporaryFile("users:\n  - name: alice\n    password_hash: \"\(try PasswordHasher.hash(Array("pw".utf8)))\"\n")
        defer { unlink(users) }
        let config = try writeTemporaryFile("""
            workers: 1
            backend: \(backend.rawValue)
            users_file: \(users)
            acl:
              allow: ["127.0.0.1/32:\(upstream.address.port)"]
            listeners:
              - name: web
                listen: 127.0.0.1:\(forwardPort)
                mode: forward
                upstream: \(upstream.address)
              - name: socks
                listen: 127.0.0.1:\(socksPort)
                mode: socks5
              - name: admin
                listen: 127.0.0.1:\(adminPort)
                mode: admin
            """)
        defer { unlink(config) }
        let child = try ChildProcess(productPath("igris"), ["serve", "-c", config])
        defer { child.terminate() }
        let admin = try SocketAddress.resolve("127.0.0.1:\(adminPort)")
        #expect(waitUntilAccepting("127.0.0.1:\(adminPort)"))
        let f = try TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(forwardPort)"))
        f.setReceiveTimeout(seconds: 10)
        f.write(Array("hello".utf8))
        #expect(try f.readExactly(5) == Array("hello".utf8))
        f.shutdownWrite()
        #expect(f.readOneByte() == 0)
        f.close()
        let (s, reply) = try Socks5Client.connect(try SocketAddress.resolve("127.0.0.1:\(socksPort)"), to: .ipv4(127, 0, 0, 1),
                                                  port: upstream.address.port, credentials: ("alice", "pw"))
        #expect(reply == 0)
        s.write([1, 2, 3])
        #expect(try s.readExactly(3) == [1, 2, 3])
        s.close()
        let (denied, no) = try Socks5Client.connect(try SocketAddress.resolve("127.0.0.1:\(socksPort)"), to: .ipv4(10, 9, 8, 7),
                                                    port: 80, credentials: ("alice", "pw"))
        #expect(no == 2)
        denied.close()
        var metrics = ""
        for _ in 0..<200 {  // until the closes are counted (bounded)
            metrics = try AdminTests.get(admin, "/metrics").body
            if metrics.contains("igris_connections_active{listener=\"socks\"} 0\n") && metrics.contains("igris_connections_active{listener=\"web\"} 0\n") { break }
            usleep(10_000)
        }
        #expect(metrics.contains("igris_connections_total{listener=\"web\"} 1\n"))
        #expect(metrics.contains("igris_connections_total{listener=\"socks\"} 2\n"))
        child.signal(SIGTERM)
        let (status, log) = child.finish()
        #expect(status == 0, "\(log)")
        let access = log.split(separator: "\n").filter { $0.contains("logger=access") }
        #expect(access.count == 3, "\(access)")
        #expect(access.contains { $0.contains("listener=web") && $0.contains("bytes_up=5 ") && $0.contains("bytes_down=5 ") && $0.contains("reason=eof") })
        #expect(access.contains { $0.contains("listener=socks") && $0.contains("user=alice") && $0.contains("bytes_up=3 ") && $0.hasSuffix("user=alice") })
        #expect(access.contains { $0.contains("destination=10.9.8.7:80") && $0.contains("reason=refused") })
        #expect(!log.contains("pw\""), "no password in the log")
    }
}
