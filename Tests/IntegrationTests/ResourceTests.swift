import Foundation
import Glibc
import IgrisEngine
import Testing

/// Runs `connections` clients that each send `size` pattern bytes while receiving the same
/// amount from the upstream (full duplex), and checks every byte by SHA-256.
func fullDuplexTransfer(_ gateway: Gateway, connections: Int, size: Int,
                        upstreamResults: SharedBox<[Int: (Int, [UInt8])]>) throws {
    let results = SharedBox<[Int: (sent: [UInt8], gotCount: Int, got: [UInt8], error: Int32?)]>([:])
    let clients = (0..<connections).map { id in
        TestThread {
            guard let socket = try? TestSocket.connect(gateway.address) else {
                results.update { $0[id] = ([], 0, [], ECONNREFUSED) }
                return
            }
            socket.setReceiveTimeout(seconds: 60)
            socket.write([UInt8(id), 0, 0, 0, 0, 0, 0, 0])
            let sent = SharedBox<[UInt8]>([])
            let writer = TestThread {
                sent.value = sendPattern(socket, seed: UInt64(id), count: size).digest
                socket.shutdownWrite()
            }
            let r = receiveDigest(socket)
            writer.join()
            socket.close()
            results.update { $0[id] = (sent.value, r.received, r.digest, r.error) }
        }
    }
    for c in clients { c.join() }
    #expect(gateway.eventually { upstreamResults.value.count == connections && gateway.active == 0 })
    for id in 0..<connections {
        let client = try #require(results.value[id], "client \(id) did not finish")
        #expect(client.error == nil, "client \(id) read error \(client.error.map(Errno.describe) ?? "")")
        #expect(client.gotCount == size, "client \(id) got \(client.gotCount) bytes")
        #expect(client.got == patternDigest(seed: UInt64(1000 + id), count: size), "client \(id): upstream→client bytes differ")
        let up = try #require(upstreamResults.value[id], "upstream never finished connection \(id)")
        #expect(up.0 == size, "upstream got \(up.0) bytes on \(id)")
        #expect(up.1 == client.sent, "connection \(id): client→upstream bytes differ")
    }
}

/// An upstream that answers each connection's 8-byte id header with `size` pattern bytes
/// (seed 1000 + id) while hashing what it receives.
func fullDuplexUpstream(size: Int, results: SharedBox<[Int: (Int, [UInt8])]>) throws -> TestUpstream {
    try TestUpstream { socket in
        guard let header = try? socket.readExactly(8) else { socket.close(); return }
        let id = Int(header[0])
        let writer = TestThread {
            _ = sendPattern(socket, seed: UInt64(1000 + id), count: size)
            socket.shutdownWrite()
        }
        let r = receiveDigest(socket)
        writer.join()
        results.update { $0[id] = (r.received, r.digest) }
        socket.close()
    }
}

@Suite("Resource exhaustion", .serialized)
struct ResourceTests {
    @Test("a 2-buffer pool under 16 full-duplex connections: ENOBUFS waits, every byte arrives", arguments: engineBackends)
    func tinyBufferPool(backend: BackendChoice) throws {
        let size = 2 << 20
        let received = SharedBox<[Int: (Int, [UInt8])]>([:])
        let upstream = try fullDuplexUpstream(size: size, results: received)
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, upstream: upstream.address, workers: 1) {
            $0.buffers = BackendConfiguration(bufferSize: 4096, bufferCount: 2)
        }
        defer { gateway.stop() }
        try fullDuplexTransfer(gateway, connections: 16, size: size, upstreamResults: received)
        #expect(gateway.server.total(.bufferExhaustions) > 0, "the pool never ran dry: the test proves nothing")
        #expect(gateway.server.total(.buffersPeak) <= 2)
        #expect(gateway.server.total(.buffersInUse) == 0)
    }

    @Test("out of descriptors: accepting pauses without spinning and recovers", arguments: engineBackends)
    func acceptPausesOnEMFILE(backend: BackendChoice) throws {
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0"])
        defer { echo.terminate() }
        let upstream = String(try #require(echo.readLine().split(separator: " ").last))
        let port = try unusedPort()
        var adminPort = try unusedPort()
        while adminPort == port { adminPort = try unusedPort() }
        // 40 descriptors: a dozen or so bridges fit, the rest must wait in the backlog.
        let child = try ChildProcess("/usr/bin/prlimit", ["--nofile=40:40", productPath("igris"),
            "--listen", "127.0.0.1:\(port)", "--upstream", upstream, "--workers", "1", "--backend", backend.rawValue,
            "--connect-timeout", "60s", "--admin", "127.0.0.1:\(adminPort)",
            // Set too high on purpose: the default follows RLIMIT_NOFILE and would never run out.
            "--max-connections", "1000"])
        defer { child.terminate() }
        let log = LogLines(child)
        let address = try SocketAddress.resolve("127.0.0.1:\(port)")
        // "forwarding" is logged once the worker accepts, after every listener (the admin one
        // too) is bound: no client of ours can take the admin's ephemeral-range port, and the
        // clients below arrive one by one at a running worker. (Had they all queued in the
        // backlog before it started, the first accept would take them in one burst, with no
        // descriptors left for their upstreams: they'd wait for the connect timeout.)
        #expect(log.wait(for: "forwarding"))
        var first: TestSocket?
        for _ in 0..<500 where first == nil {
            first = try? TestSocket.connect(address)
            if first == nil { usleep(10_000) }
        }
        let clients = [try #require(first)] + (try (1..<40).map { _ in try TestSocket.connect(address) })
        // Each client: one byte out, its echo back (or a close when it hit the boundary).
        let served = SharedCounter()
        let closed = SharedCounter()
        let threads = clients.map { c in
            TestThread {
                c.setReceiveTimeout(seconds: 30)
                c.write([42])
                var b = [UInt8](repeating: 0, count: 1)
                let n = b.withUnsafeMutableBytes { c.read(into: $0) }
                if n == 1 && b[0] == 42 { served.add(1) } else { closed.add(1) }
            }
        }
        // Wait for the gateway to fill up (the count of answered clients settles); the rest
        // wait in the backlog or, accepted, for a descriptor for their upstream.
        let deadline = Date().addingTimeInterval(10)
        var settled = -1
        while Date() < deadline {
            let now = served.value + closed.value
            if now > 0 && now == settled { break }
            settled = now
            usleep(300_000)
        }
        // Some clients wait in the backlog or for a descriptor: the limit was hit.
        #expect(served.value < 40, "every client was served: the limit was not reached")
        let pid = child.process.processIdentifier
        let cpuBefore = processCPUSeconds(pid)
        usleep(2_000_000)  // the scenario: 2 s out of descriptors with clients waiting
        let cpuSpent = processCPUSeconds(pid) - cpuBefore
        #expect(cpuSpent < 0.5, "igris burnt \(cpuSpent) s of CPU in 2 s while out of descriptors")
        // One more client finds the gateway out of descriptors. The admin endpoint still answers
        // (it keeps a descriptor in reserve), and says so.
        // More clients until the gateway is out of descriptors again (those already here may
        // have been served or closed by now), bounded. The admin endpoint still answers (it
        // keeps a descriptor in reserve), and says so.
        let admin = try SocketAddress.resolve("127.0.0.1:\(adminPort)")
        var extra: [TestSocket] = []
        var paused = false
        while !paused && extra.count < 40 {
            extra.append(try TestSocket.connect(address))
            paused = eventually(seconds: 1) { (try? AdminTests.get(admin, "/healthz"))?.body.contains("accepting paused") == true }
        }
        #expect(paused, "/healthz answers and says accepting is paused")
        #expect(try AdminTests.get(admin, "/readyz").status.contains(" 503 "), "not ready while accepting is paused")
        let metrics = try AdminTests.get(admin, "/metrics")
        #expect(metrics.status.contains(" 200 ") && metrics.body.contains("igris_accept_paused{worker=\"0\"} 1"), "\(metrics.body.prefix(200))")
        for c in extra { c.close() }

        // Free descriptors: waiting clients are accepted and served, whether they waited in
        // the backlog or, accepted with the last descriptors, for one for their upstream.
        // None was accepted only to be closed, and none hangs.
        for c in clients { c.shutdownWrite() }
        for t in threads { t.join() }
        for c in clients { c.close() }
        #expect(served.value + closed.value == 40)
        #expect(closed.value == 0, "served \(served.value), closed \(closed.value) of 40")
        // Recovered: once the first wave is gone, new clients are bridged again.
        for i in 0..<10 {
            let c = try TestSocket.connect(address)
            c.setReceiveTimeout(seconds: 10)
            c.write([UInt8(i)])
            #expect(try c.readExactly(1) == [UInt8(i)])
            c.close()
        }
        #expect(eventually { (try? AdminTests.get(admin, "/readyz"))?.status.contains(" 200 ") == true }, "ready again")
        child.signal(SIGTERM)
        let result = child.finish()
        #expect(result.status == 0)
        #expect(log.lines.value.contains { $0.contains("accept paused") }, "stderr: \(log.lines.value.suffix(5))")
    }
}

/// utime + stime of a process, in seconds.
func processCPUSeconds(_ pid: Int32) -> Double {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return 0 }
    let fields = text[text.index(after: close)...].split(separator: " ")
    let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
    return ((Double(fields[11]) ?? 0) + (Double(fields[12]) ?? 0)) / ticks
}
