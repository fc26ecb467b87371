import Foundation
import Glibc
import IgrisEngine
import Testing

/// `direct_descriptors`: on io_uring a bridged connection's sockets move into the worker
/// ring's fixed-file table, out of the process's descriptor table, so bridges are no longer
/// bounded by RLIMIT_NOFILE. epoll has no such table and refuses the setting.
@Suite("Direct descriptors", .serialized)
struct DirectDescriptorTests {
    static func gateway(_ upstream: SocketAddress) throws -> Gateway {
        try Gateway(backend: .ioUring, splice: .always, upstream: upstream) { $0.directDescriptors = true }
    }

    @Test("8 connections × 8 MiB each way through direct descriptors arrive intact (SHA-256), on the copy path whatever --splice says")
    func integrity() throws {
        let size = 8 << 20
        let connections = 8
        let received = SharedBox<[Int: (Int, [UInt8])]>([:])
        let upstream = try fullDuplexUpstream(size: size, results: received)
        defer { upstream.stop() }
        let gateway = try Self.gateway(upstream.address)
        defer { gateway.stop() }
        try fullDuplexTransfer(gateway, connections: connections, size: size, upstreamResults: received)
        #expect(gateway.server.total(.directBridges) == Int64(connections))
        #expect(gateway.server.total(.spliceBytes) == 0)
        #expect(gateway.server.total(.bytesUpstreamToClient) == Int64(connections * size))
        #expect(gateway.eventually { gateway.active == 0 })
        #expect(gateway.server.total(.buffersInUse) == 0)
    }

    @Test("half-close through direct descriptors: the upstream sees EOF (the ring's shutdown), its reply still arrives")
    func halfClose() throws {
        try clientHalfClose(Self.gateway) { #expect($0.server.total(.directBridges) == 1) }
    }

    @Test("a client reset through direct descriptors resets the upstream too, and frees the slot")
    func resetPropagates() throws {
        let upstreamEnd = SharedBox<Int?>(nil)
        let upstream = try TestUpstream { socket in
            socket.write([1])
            var buffer = [UInt8](repeating: 0, count: 16)
            var n = 0
            repeat { n = buffer.withUnsafeMutableBytes { socket.read(into: $0) } } while n > 0
            upstreamEnd.value = n
            socket.close()
        }
        defer { upstream.stop() }
        let gateway = try Self.gateway(upstream.address)
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        client.setReceiveTimeout(seconds: 10)
        #expect(try client.readExactly(1) == [1])
        client.reset()
        #expect(gateway.eventually { upstreamEnd.value != nil && gateway.active == 0 })
        // RST where the kernel takes setsockopt through the ring (6.7+), else FIN.
        let resets = IOUringProbe.directDescriptors().resets
        #expect(upstreamEnd.value == -Int(ECONNRESET) || (!resets && upstreamEnd.value == 0), "\(String(describing: upstreamEnd.value))")
        #expect(gateway.server.total(.closedAborted) == 1)
    }

    /// igris in a process of its own with RLIMIT_NOFILE at 600: 500 bridges are 1,000 sockets.
    @Test("500 bridges, 1,000 sockets, in an igris whose descriptor limit is 600, each verified twice; closed, then 500 more in the freed entries",
          arguments: engineBackends)
    func pastTheDescriptorLimit(backend: BackendChoice) throws {
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0", "--threads", "2"])
        defer { echo.terminate() }
        let line = echo.readLine()
        let upstream = try #require(line.split(separator: " ").last.map(String.init), "igris-load said '\(line)'")
        let (port, adminPort) = (try unusedPort(), try unusedPort())
        let command = "ulimit -n 600 && exec '\(productPath("igris"))' serve --listen 127.0.0.1:\(port) --upstream \(upstream) "
            + "--backend \(backend.rawValue) --workers 2 --direct-descriptors --no-access-log --admin 127.0.0.1:\(adminPort) --max-connections-per-source 0"
        let igris = try ChildProcess("/bin/sh", ["-c", command])
        defer { igris.terminate() }
        guard backend == .ioUring else {
            let (status, stderr) = igris.finish()
            #expect(status != 0)
            #expect(stderr.contains("direct descriptors need the io_uring backend"), "\(stderr)")
            return
        }
        let log = LogLines(igris)
        #expect(log.wait(for: "forwarding"))
        let admin = try SocketAddress.resolve("127.0.0.1:\(adminPort)")
        let address = try SocketAddress.resolve("127.0.0.1:\(port)")
        let count = 500
        for round in 0..<2 {
            var clients: [TestSocket] = []
            defer { for c in clients { c.close() } }
            for i in 0..<count {
                let c = try TestSocket.connect(address)
                c.setReceiveTimeout(seconds: 10)
                let b = UInt8(truncatingIfNeeded: i)
                c.write([b])
                #expect(try c.readExactly(1) == [b])
                clients.append(c)
            }
            #expect(HandoffTests.metric(admin, "igris_connections_active") == count)
            #expect(HandoffTests.metric(admin, "igris_direct_bridges_total") == count * (round + 1))
            #expect(HandoffTests.metric(admin, "igris_direct_table_full_total") == 0)
            let held = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(igris.process.processIdentifier)/fd").count) ?? -1
            #expect(held >= 0 && held < 64, "igris holds \(held) descriptors for \(count) bridges")
            // Held: every bridge still answers, 4 KiB each way.
            for (i, c) in clients.enumerated() {
                let bytes = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ i) }
                c.write(bytes)
                #expect(try c.readExactly(4096) == bytes)
            }
            for c in clients { c.close() }
            clients.removeAll()
            #expect(eventually(seconds: 30) { HandoffTests.metric(admin, "igris_connections_active") == 0 })
        }
        #expect(HandoffTests.metric(admin, "igris_accept_pauses_total") == 0)
    }
}
