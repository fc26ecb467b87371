import Dispatch
import Foundation
import Glibc
import IgrisEngine
import Testing

/// SIGHUP: listeners come and go; open connections and transfers carry on; a bad file is
/// rejected while the running configuration stays.
@Suite("Reload (SIGHUP)", .serialized)
struct ReloadTests {
    static func config(_ listeners: [(String, UInt16)], upstream: SocketAddress, broken: Bool = false) -> String {
        var text = "workers: 2\nlisteners:\n"
        for (name, port) in listeners {
            text += "  - name: \(name)\n    listen: 127.0.0.1:\(port)\n    mode: forward\n    upstream: \(upstream)\n"
        }
        if broken { text += "  - name: oops\n    listen: 127.0.0.1:1\n    mode: teleport\n" }
        return text
    }

    static func accepts(_ port: UInt16) -> Bool {
        guard let s = try? TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(port)")) else { return false }
        s.close()
        return true
    }

    @Test("SIGHUP adds and removes listeners while a transfer on another runs intact; a bad file is rejected", arguments: engineBackends)
    func reload(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let (a, b) = (try unusedPort(), try unusedPort())
        let path = try writeTemporaryFile(Self.config([("a", a)], upstream: upstream.address))
        defer { unlink(path) }
        let child = try ChildProcess(productPath("igris"), ["serve", "-c", path, "--backend", backend.rawValue])
        defer { child.terminate() }
        let log = LogLines(child)
        #expect(log.wait(for: "forwarding"))

        // A long transfer through "a", running across every reload below.
        let transfer = try TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(a)"))
        transfer.setReceiveTimeout(seconds: 30)
        let total = 48 << 20
        let received = SharedBox<(Int, [UInt8])>((0, []))
        let reader = TestThread { received.update { $0 = { let r = receiveDigest(transfer); return (r.received, r.digest) }() } }
        // Half goes now; the rest once every reload below is done, so the transfer spans them.
        let reloadsDone = DispatchSemaphore(value: 0)
        let halfSent = DispatchSemaphore(value: 0)
        let writer = TestThread {
            _ = sendPattern(transfer, seed: 42, count: total, chunk: 64 * 1024, midway: (total / 2, { halfSent.signal(); reloadsDone.wait() }))
            transfer.shutdownWrite()
        }
        #expect(halfSent.wait(timeout: .now() + 10) == .success, "the first half was sent before the reloads")

        // Add "b".
        try Self.config([("a", a), ("b", b)], upstream: upstream.address).write(toFile: path, atomically: true, encoding: .utf8)
        child.signal(SIGHUP)
        #expect(log.wait(for: "configuration reloaded"))
        #expect(log.lines.value.contains { $0.contains("added=b") && $0.contains("kept=a") })
        let viaB = try TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(b)"))
        viaB.setReceiveTimeout(seconds: 10)
        viaB.write([9, 8, 7])
        #expect(try viaB.readExactly(3) == [9, 8, 7])

        // A broken file: rejected, both listeners keep working.
        try Self.config([("a", a), ("b", b)], upstream: upstream.address, broken: true).write(toFile: path, atomically: true, encoding: .utf8)
        child.signal(SIGHUP)
        #expect(log.wait(for: "reload rejected"))
        #expect(log.lines.value.contains { $0.contains("reload rejected") && $0.contains("listeners[2].mode") })
        #expect(Self.accepts(a) && Self.accepts(b))

        // Remove "a": it stops accepting; the transfer through it and b's open bridge go on.
        try Self.config([("b", b)], upstream: upstream.address).write(toFile: path, atomically: true, encoding: .utf8)
        child.signal(SIGHUP)
        #expect(log.wait(for: "configuration reloaded", count: 2))
        var refused = false
        for _ in 0..<500 where !refused {
            if Self.accepts(a) { usleep(10_000) } else { refused = true }
        }
        #expect(refused, "the removed listener still accepts")
        viaB.write([1])
        #expect(try viaB.readExactly(1) == [1])
        viaB.close()

        reloadsDone.signal()
        writer.join()
        reader.join()
        transfer.close()
        #expect(received.value.0 == total)
        #expect(received.value.1 == patternDigest(seed: 42, count: total), "the transfer across three reloads arrived intact")

        child.signal(SIGTERM)
        #expect(log.wait(for: "stopped"))
    }
}

@Suite("SIGTERM with the admin endpoint", .serialized)
struct DrainTests {
    @Test("SIGTERM: /readyz turns 503 at once, the transfer in flight finishes intact, then exit 0", arguments: engineBackends)
    func drain(backend: BackendChoice) throws {
        let reply = 8 << 20
        let upstream = try answeringUpstream(seed: 5, count: reply)
        defer { upstream.stop() }
        let (port, adminPort) = (try unusedPort(), try unusedPort())
        let path = try writeTemporaryFile("""
            backend: \(backend.rawValue)
            drain_timeout: 20s
            listeners:
              - {name: web, listen: "127.0.0.1:\(port)", mode: forward, upstream: "\(upstream.address)"}
              - {name: admin, listen: "127.0.0.1:\(adminPort)", mode: admin}
            """)
        defer { unlink(path) }
        let child = try ChildProcess(productPath("igris"), ["serve", "-c", path])
        defer { child.terminate() }
        let log = LogLines(child)
        #expect(log.wait(for: "mode=admin"))
        let admin = try SocketAddress.resolve("127.0.0.1:\(adminPort)")
        #expect(try AdminTests.get(admin, "/readyz") == ("HTTP/1.1 200 OK", "ready\n"))

        // The client sends its request, then reads the 8 MiB answer slowly enough that the
        // drain starts while it is still in flight: it waits for readyz to fail first.
        let client = try TestSocket.connect(try SocketAddress.resolve("127.0.0.1:\(port)"))
        client.setReceiveTimeout(seconds: 20)
        _ = sendPattern(client, seed: 4, count: 1 << 20)
        client.shutdownWrite()
        let first = try client.readExactly(1)
        child.signal(SIGTERM)
        #expect(log.wait(for: "draining"))
        #expect(try AdminTests.get(admin, "/readyz") == ("HTTP/1.1 503 Service Unavailable", "draining\n"))
        var hash = SHA256()
        first.withUnsafeBytes { hash.update($0) }
        var got = 1
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { client.read(into: $0) }
            if n <= 0 { break }
            buffer.withUnsafeBytes { hash.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            got += n
        }
        client.close()
        #expect(got == reply)
        #expect(hash.finish() == patternDigest(seed: 5, count: reply))
        #expect(log.wait(for: "stopped"))
        let (status, _) = child.finish()
        #expect(status == 0)
    }

    @Test("SIGHUP replacing a listener (same address, new settings) 20 times under churn resets no connection", arguments: engineBackends)
    func replaceUnderChurn(backend: BackendChoice) throws {
        let (echo, upstream) = try HandoffTests.echoServer()
        defer { echo.terminate() }
        let port = try unusedPort()
        func config(_ timeout: Int) -> String {
            """
            backend: \(backend.rawValue)
            workers: 2
            log: {access_log: false}
            listeners:
              - {name: tunnels, listen: "127.0.0.1:\(port)", mode: forward, upstream: "\(upstream)", connect_timeout: \(timeout)s}
            """
        }
        let path = try writeTemporaryFile(config(5))
        defer { unlink(path) }
        let child = try ChildProcess(productPath("igris"), ["serve", "-c", path])
        defer { child.terminate() }
        let log = LogLines(child)
        #expect(log.wait(for: "forwarding"))
        let churn = try ChildProcess(productPath("igris-load"), ["churn", "--connect", "127.0.0.1:\(port)", "--connections", "8",
                                                                 "--duration", "4", "--json"])
        defer { churn.terminate() }
        for i in 1...20 {
            try config(5 + i % 2).write(toFile: path, atomically: true, encoding: .utf8)
            child.signal(SIGHUP)
            #expect(log.wait(for: "configuration reloaded", count: i))
        }
        #expect(log.lines.value.filter { $0.contains("configuration reloaded") && $0.contains("removed=tunnels") }.count == 20)
        let result = HandoffTests.churnResult(churn)
        print("20 listener replacements (\(backend)): \(result.connections) churn connections, \(result.failures) failed")
        #expect(result.connections > 0)
        #expect(result.failures == 0, "connections queued on a replaced listener were reset")
    }
}
