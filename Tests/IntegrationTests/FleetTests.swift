import Foundation
import Glibc
import IgrisEngine
import Testing

/// deploy/fleet/haproxy.cfg as written (addresses substituted): a real HAProxy with
/// send-proxy-v2 and /readyz checks in front of 3 igris processes, restarted one by one
/// (SIGTERM drain, start again) under a churn client.
@Suite("Fleet behind HAProxy", .serialized)
struct FleetTests {
    struct Instance {
        var port: UInt16
        var adminPort: UInt16
        var config: String
        var child: ChildProcess
        var log: LogLines
    }

    static func start(_ config: String) throws -> (ChildProcess, LogLines) {
        let child = try ChildProcess(productPath("igris"), ["serve", "-c", config])
        let log = LogLines(child)
        return (child, log)
    }

    @Test("rolling restart of 3 instances under churn: no failed connection; access logs show the clients' own addresses")
    func rollingRestart() throws {
        let (echo, upstream) = try HandoffTests.echoServer()
        defer { echo.terminate() }
        var instances: [Instance] = []
        defer { for i in instances { i.child.terminate() } }
        for k in 0..<3 {
            let (port, adminPort) = (try unusedPort(), try unusedPort())
            // drain_grace above HAProxy's inter × fall (500 ms × 1) plus a check's latency.
            let config = try writeTemporaryFile("""
                workers: 2
                drain_grace: 1500ms
                drain_timeout: 5s
                listeners:
                  - {name: vpn, listen: "127.0.0.1:\(port)", mode: forward, upstream: "\(upstream)", accept_proxy_protocol: true,
                      proxy_protocol_from: [127.0.0.9/32]}
                  - {name: admin, listen: "127.0.0.1:\(adminPort)", mode: admin}
                """)
            let (child, log) = try Self.start(config)
            #expect(log.wait(for: "forwarding"), "instance \(k) started")
            instances.append(Instance(port: port, adminPort: adminPort, config: config, child: child, log: log))
        }
        defer { for i in instances { unlink(i.config) } }

        // The recipe, with this test's addresses; HAProxy connects to igris from 127.0.0.9 so
        // that its address can't be mistaken for the client's (127.0.0.1).
        let inbound = try unusedPort()
        var recipe = try String(contentsOfFile: "\(DeployTests.root)/deploy/fleet/haproxy.cfg", encoding: .utf8)
        recipe = recipe.replacingOccurrences(of: "bind 0.0.0.0:443", with: "bind 127.0.0.1:\(inbound)")
            .replacingOccurrences(of: "maxconn 100000", with: "maxconn 4000")  // within this machine's 20,000 descriptors
        recipe = recipe.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.trimmingCharacters(in: .whitespaces).hasPrefix("server ") }.joined(separator: "\n")
        for (k, i) in instances.enumerated() {
            recipe += "\n    server igris\(k + 1) 127.0.0.1:\(i.port) check port \(i.adminPort) source 127.0.0.9"
        }
        #expect(recipe.contains("send-proxy-v2") && recipe.contains("option httpchk GET /readyz"))
        let haproxyConfig = try writeTemporaryFile(recipe + "\n")
        defer { unlink(haproxyConfig) }
        let haproxy = try ChildProcess("/usr/sbin/haproxy", ["-f", haproxyConfig, "-db"])
        defer { haproxy.terminate() }
        guard waitUntilAccepting("127.0.0.1:\(inbound)") else {
            haproxy.signal(SIGTERM)
            Issue.record("haproxy did not start: \(haproxy.finish().stderr.replacingOccurrences(of: "\n", with: " | "))")
            return
        }
        func served(_ i: Instance) -> Int {
            HandoffTests.metric(try! SocketAddress.resolve("127.0.0.1:\(i.adminPort)"), "igris_connections_total{listener=\"vpn\"}") ?? 0
        }
        // HAProxy sends to an instance once its checks passed (rise 2): connect until each got one.
        let front = try SocketAddress.resolve("127.0.0.1:\(inbound)")
        #expect(eventually(seconds: 15) {
            if instances.allSatisfy({ served($0) > 0 }) { return true }
            (try? TestSocket.connect(front))?.close()
            return false
        }, "every instance gets connections")

        let churn = try ChildProcess(productPath("igris-load"), ["churn", "--connect", "127.0.0.1:\(inbound)", "--connections", "4",
                                                                 "--duration", "14", "--json"])
        defer { churn.terminate() }
        var restarts: [String] = []
        for k in instances.indices {
            let before = Date()
            instances[k].child.signal(SIGTERM)
            let (status, _) = instances[k].child.finish(timeout: 15)
            #expect(status == 0, "instance \(k) drained and exited")
            let (child, log) = try Self.start(instances[k].config)
            instances[k].child = child
            instances[k].log = log
            #expect(log.wait(for: "forwarding"), "instance \(k) restarted")
            // Back in HAProxy's rotation before the next one goes.
            #expect(eventually(seconds: 15) { served(instances[k]) > 0 }, "instance \(k) serves again")
            restarts.append(String(format: "%.1f s", Date().timeIntervalSince(before)))
        }
        let result = HandoffTests.churnResult(churn)
        print("fleet rolling restart: \(result.connections) churn connections, \(result.failures) failed; restarts took \(restarts.joined(separator: ", "))")
        #expect(result.connections > 0)
        #expect(result.failures == 0, "connections failed during the rolling restart (\(restarts))")

        // PROXY v2 carried the clients' own address: HAProxy's (127.0.0.9) never appears.
        let access = instances.flatMap { $0.log.lines.value.filter { $0.contains("logger=access") } }
        #expect(access.contains { $0.contains("client=127.0.0.1:") },
                "\(access.count) access lines, e.g. \(access.first ?? instances[0].log.lines.value.suffix(3).joined(separator: " | "))")
        #expect(!access.contains { $0.contains("client=127.0.0.9") })
        for i in instances { i.child.signal(SIGTERM) }
        for i in instances { #expect(i.child.finish().status == 0) }
    }
}
