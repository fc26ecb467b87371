import Foundation
import Glibc
import IgrisEngine
import Testing

/// Zero-downtime upgrades: a successor takes the listening sockets over (`--takeover`, or
/// SIGUSR2), new connections land there, the predecessor's tunnels drain; a successor that
/// fails leaves the predecessor accepting; SIGHUP replacing a listener resets nothing.
@Suite("Listener hand-off", .serialized)
struct HandoffTests {
    /// An igris-load echo server in a process of its own (1,000 held + churn connections).
    static func echoServer() throws -> (ChildProcess, String) {
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0", "--threads", "2"])
        let line = echo.readLine()
        return (echo, String(line.dropFirst("listening ".count)))
    }

    /// An echo server, a port and an admin port for igris, and a hand-off socket path; the
    /// echo server stops and the socket file goes with the fixture.
    final class Fixture {
        let echo: ChildProcess
        let upstream: String
        let port: UInt16
        let adminPort: UInt16
        let handoff = HandoffTests.handoffPath()

        init() throws {
            (echo, upstream) = try HandoffTests.echoServer()
            (port, adminPort) = (try unusedPort(), try unusedPort())
        }

        deinit {
            echo.terminate()
            unlink(handoff)
        }

        /// A configuration file for this fixture's listener, admin port and hand-off socket.
        func configFile(backend: BackendChoice = .auto, workers: Int, drainTimeout: String = "30s", extra: String = "") throws -> String {
            try writeTemporaryFile(HandoffTests.config(backend: backend, workers: workers, port: port, adminPort: adminPort,
                                                       upstream: upstream, handoff: handoff, drainTimeout: drainTimeout, extra: extra))
        }
    }

    static func config(backend: BackendChoice, workers: Int, port: UInt16, adminPort: UInt16, upstream: String,
                       handoff: String, drainTimeout: String = "30s", extra: String = "") -> String {
        """
        backend: \(backend.rawValue)
        workers: \(workers)
        max_connections: 5000
        handoff_socket: \(handoff)
        drain_timeout: \(drainTimeout)
        log: {access_log: false}
        listeners:
          - {name: tunnels, listen: "127.0.0.1:\(port)", mode: forward, upstream: "\(upstream)"}
          - {name: admin, listen: "127.0.0.1:\(adminPort)", mode: admin}
        \(extra)
        """
    }

    static func handoffPath() -> String { NSTemporaryDirectory() + "igris-handoff-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock" }

    /// `churn` (connect, echo, close, 4 threads) for `seconds`: connections and failures.
    static func churn(_ target: String, seconds: Int) throws -> ChildProcess {
        try ChildProcess(productPath("igris-load"), ["churn", "--connect", target, "--connections", "4", "--duration", "\(seconds)", "--json"])
    }

    static func churnResult(_ child: ChildProcess) -> (connections: Int, failures: Int) {
        let line = child.readLine()
        _ = child.finish()
        func field(_ name: String) -> Int {
            guard let r = line.range(of: "\"\(name)\":") else { return -1 }
            return Int(line[r.upperBound...].prefix { $0.isNumber }) ?? -1
        }
        return (field("connections"), field("failures"))
    }

    static func metric(_ admin: SocketAddress, _ name: String) -> Int? {
        guard let (_, body) = try? AdminTests.get(admin, "/metrics") else { return nil }
        let values = body.split(separator: "\n").filter { $0.hasPrefix(name) }.compactMap { $0.split(separator: " ").last.flatMap { Double($0) } }
        return values.isEmpty ? nil : Int(values.reduce(0, +))
    }

    @Test("upgrade under load: churn sees no failure, 1,000 tunnels echo on in the old process until its deadline, new connections land in the new one",
          arguments: engineBackends)
    func upgradeUnderLoad(backend: BackendChoice) throws {
        let fixture = try Fixture()
        let (port, adminPort) = (fixture.port, fixture.adminPort)
        let oldConfig = try fixture.configFile(backend: backend, workers: 2, drainTimeout: "4s")
        // The successor has a different worker count.
        let newConfig = try fixture.configFile(backend: backend, workers: 3)
        defer { unlink(oldConfig); unlink(newConfig) }
        let old = try ChildProcess(productPath("igris"), ["serve", "-c", oldConfig])
        defer { old.terminate() }
        let oldLog = LogLines(old)
        #expect(oldLog.wait(for: "forwarding"))
        let target = "127.0.0.1:\(port)"
        let admin = try SocketAddress.resolve("127.0.0.1:\(adminPort)")

        // 1,000 tunnels, each echoing once a second for 9 s: across the hand-off and past the
        // old process's 4 s drain deadline.
        let holder = try ChildProcess(productPath("igris-load"), ["hold", "--connect", target, "--connections", "1000",
                                                                  "--hold", "9", "--echo-every", "1"])
        defer { holder.terminate() }
        #expect(holder.readLine() == "hold open=1000")
        let churn = try Self.churn(target, seconds: 5)
        defer { churn.terminate() }
        #expect(eventually { (Self.metric(admin, "igris_connections_total{listener=\"tunnels\"}") ?? 0) > 1500 }, "churn runs")

        let new = try ChildProcess(productPath("igris"), ["serve", "-c", newConfig, "--takeover"])
        defer { new.terminate() }
        let newLog = LogLines(new)
        #expect(newLog.wait(for: "took the listeners over"))
        #expect(oldLog.wait(for: "listeners handed over"))
        // The admin endpoint went over too: these are the new process's counters, and churn
        // connections land there.
        #expect(eventually { (Self.metric(admin, "igris_connections_total{listener=\"tunnels\"}") ?? 0) > 100 },
                "new connections are accepted by the new process")

        let result = Self.churnResult(churn)
        print("upgrade under load (\(backend)): \(result.connections) churn connections, \(result.failures) failed")
        #expect(result.connections > 0)
        #expect(result.failures == 0, "churn connections failed or were reset during the hand-off")

        // The old process closes its 1,000 tunnels at its deadline and exits by itself.
        let (oldStatus, _) = old.finish(timeout: 15)
        #expect(oldStatus == 0)
        #expect(oldLog.lines.value.contains { $0.contains("stopped") && $0.contains("aborted_at_deadline=1000") },
                "\(oldLog.lines.value.filter { $0.contains("stopped") })")
        let held = holder.readLine()
        _ = holder.finish()
        // Every round before the deadline echoed on every tunnel (errors=0), and all 1,000
        // were ended by the old process (closed_by_peer), none earlier than 2 rounds in.
        #expect(held.contains("errors=0") && held.contains("closed_by_peer=1000") && held.contains("open_at_end=0"), "\(held)")
        let firstClose = held.split(separator: " ").first { $0.hasPrefix("first_close_after_rounds=") }
            .flatMap { Int($0.dropFirst("first_close_after_rounds=".count)) } ?? 0
        #expect(firstClose >= 2, "\(held)")

        // The new process serves on alone.
        let s = try TestSocket.connect(try SocketAddress.resolve(target))
        s.setReceiveTimeout(seconds: 5)
        #expect(s.write([1, 2, 3]))
        #expect(try s.readExactly(3) == [1, 2, 3])
        s.close()
        new.signal(SIGTERM)
        #expect(new.finish().status == 0)
    }

    @Test("a failed upgrade leaves the old process accepting: broken config, a listener that can't bind; a second start without --takeover is refused",
          arguments: engineBackends)
    func failedUpgrade(backend: BackendChoice) throws {
        let fixture = try Fixture()
        let (upstream, port) = (fixture.upstream, fixture.port)
        let oldConfig = try fixture.configFile(backend: backend, workers: 2)
        // Takes the sockets, then fails to bind a port something else holds.
        let (blocker, blocked) = try listeningSocket("127.0.0.1:0", backlog: 4)
        defer { Glibc.close(blocker) }
        let unbindable = try fixture.configFile(backend: backend, workers: 2, extra: "  - {name: extra, listen: \"\(blocked)\", mode: forward, upstream: \"\(upstream)\"}")
        let broken = try fixture.configFile(backend: backend, workers: 2, extra: "  - {name: oops, listen: \"127.0.0.1:1\", mode: teleport}")
        defer { unlink(oldConfig); unlink(unbindable); unlink(broken) }
        let old = try ChildProcess(productPath("igris"), ["serve", "-c", oldConfig])
        defer { old.terminate() }
        let oldLog = LogLines(old)
        #expect(oldLog.wait(for: "forwarding"))
        let target = "127.0.0.1:\(port)"
        let churn = try Self.churn(target, seconds: 3)
        defer { churn.terminate() }

        let brokenRun = try runCommand(productPath("igris"), ["serve", "-c", broken, "--takeover"])
        #expect(brokenRun.status != 0)
        #expect(brokenRun.stderr.contains("listeners[2].mode"), "\(brokenRun.stderr)")
        for _ in 0..<3 {
            let failed = try runCommand(productPath("igris"), ["serve", "-c", unbindable, "--takeover"])
            #expect(failed.status != 0)
            #expect(failed.stderr.contains("cannot listen on \(blocked)"), "\(failed.stderr)")
        }
        #expect(oldLog.wait(for: "hand-off abandoned", count: 3))
        let second = try runCommand(productPath("igris"), ["serve", "-c", oldConfig])
        #expect(second.status != 0)
        #expect(second.stderr.contains("in use by a running igris"), "\(second.stderr)")
        let flags = try runCommand(productPath("igris"), ["serve", "--listen", target, "--upstream", upstream])
        #expect(flags.status != 0)
        #expect(flags.stderr.contains("Address already in use by another process"), "\(flags.stderr)")

        let result = Self.churnResult(churn)
        #expect(result.connections > 0)
        #expect(result.failures == 0, "the old process stopped serving during failed upgrades")
        #expect(!oldLog.lines.value.contains { $0.contains("listeners handed over") })
        old.signal(SIGTERM)
        #expect(old.finish().status == 0)
    }

    @Test("SIGUSR2 starts the successor from the same command line; it takes over, tells systemd it is the main process, and the old process exits")
    func upgradeBySignal() throws {
        let fixture = try Fixture()
        let port = fixture.port
        let path = try fixture.configFile(workers: 2)
        defer { unlink(path) }
        let notify = try NotifySocket(path: Self.handoffPath() + ".notify")
        let old = try ChildProcess(productPath("igris"), ["serve", "-c", path], environment: ["NOTIFY_SOCKET": notify.path])
        var reaped = false
        defer { if !reaped { old.terminate() } }
        let log = LogLines(old)  // the successor inherits the same stderr
        #expect(log.wait(for: "forwarding"))
        #expect(notify.receive() == "READY=1")
        let churn = try Self.churn("127.0.0.1:\(port)", seconds: 3)
        defer { churn.terminate() }
        old.signal(SIGUSR2)
        let message = notify.receive()
        #expect(log.wait(for: "took the listeners over"))
        let started = log.lines.value.first { $0.contains("successor started") } ?? ""
        let successor = started.split(separator: " ").first { $0.hasPrefix("pid=") }.flatMap { Int32($0.dropFirst(4)) }
        defer { if let successor { kill(successor, SIGKILL) } }
        #expect(successor != nil && message == "MAINPID=\(successor!)\nREADY=1", "\(message)")
        // Not finish(): the successor holds the same stderr pipe open, so it never ends.
        let status = old.waitForExit()
        reaped = status != nil
        #expect(status == 0, "the old process exits once drained (status \(String(describing: status)))")
        let result = Self.churnResult(churn)
        #expect(result.connections > 0 && result.failures == 0, "\(result)")
        if let successor {
            kill(successor, SIGTERM)
            #expect(eventually { kill(successor, 0) != 0 }, "the successor stops on SIGTERM")
        }
    }

    @Test("a successor with other listeners: the kept one goes over, the new one is bound, the dropped one closes with the old process")
    func changedListeners() throws {
        let fixture = try Fixture()
        let (upstream, kept) = (fixture.upstream, fixture.port)
        let (dropped, added) = (try unusedPort(), try unusedPort())
        let oldConfig = try fixture.configFile(workers: 2, extra: "  - {name: dropped, listen: \"127.0.0.1:\(dropped)\", mode: forward, upstream: \"\(upstream)\"}")
        let newConfig = try fixture.configFile(workers: 2, extra: "  - {name: added, listen: \"127.0.0.1:\(added)\", mode: forward, upstream: \"\(upstream)\"}")
        defer { unlink(oldConfig); unlink(newConfig) }
        let old = try ChildProcess(productPath("igris"), ["serve", "-c", oldConfig])
        defer { old.terminate() }
        let oldLog = LogLines(old)
        #expect(oldLog.wait(for: "forwarding", count: 2))
        // A tunnel through the listener that goes away: it lives on in the old process.
        let tunnel = try TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(dropped)"))
        tunnel.setReceiveTimeout(seconds: 10)
        #expect(tunnel.write([7]))
        #expect(try tunnel.readExactly(1) == [7])

        let new = try ChildProcess(productPath("igris"), ["serve", "-c", newConfig, "--takeover"])
        defer { new.terminate() }
        let newLog = LogLines(new)
        #expect(newLog.wait(for: "took the listeners over"))
        #expect(newLog.lines.value.contains { $0.contains("took the listeners over") && $0.contains("dropped=127.0.0.1:\(dropped)") })
        for port in [kept, added] {
            let s = try TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(port)"))
            s.setReceiveTimeout(seconds: 10)
            #expect(s.write([UInt8(port & 0xFF)]))
            #expect(try s.readExactly(1) == [UInt8(port & 0xFF)])
            s.close()
        }
        #expect((try? TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(dropped)"))) == nil, "the dropped listener still accepts")
        #expect(tunnel.write([8]))
        #expect(try tunnel.readExactly(1) == [8], "the old process still serves its tunnel")
        tunnel.close()
        #expect(old.waitForExit() == 0, "the old process exits once its tunnel closed")
        new.signal(SIGTERM)
        #expect(new.finish().status == 0)
    }
}

/// The datagram socket systemd listens on for sd_notify messages (NOTIFY_SOCKET).
final class NotifySocket {
    let path: String
    let fd: Int32

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (k, b) in path.utf8.enumerated() { raw[k] = b }
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw TestFailure("bind \(path): \(errno)") }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit {
        Glibc.close(fd)
        unlink(path)
    }

    /// The next message (10 s at most), or "".
    func receive() -> String {
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = recv(fd, &buffer, buffer.count, 0)
        return n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : ""
    }
}
