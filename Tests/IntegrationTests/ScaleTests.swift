import Foundation
import Glibc
import IgrisEngine
import Testing

@Suite("Scale", .serialized)
struct ScaleTests {
    /// 5,000 bridges: 5,000 client fds here + 10,000 in the gateway; the echo upstream runs
    /// in its own process (igris-load echo) to stay under the 20,000-fd limit.
    @Test("5,000 concurrent bridges, each verified by a 1-byte echo, then all closed", arguments: engineBackends, spliceModes)
    func fiveThousandBridges(backend: BackendChoice, splice: SpliceMode) throws {
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0", "--threads", "2"])
        defer { echo.terminate() }
        let line = echo.readLine()
        let upstreamText = try #require(line.split(separator: " ").last.map(String.init), "igris-load said '\(line)'")
        let gateway = try Gateway(backend: backend, splice: splice, upstream: try SocketAddress.resolve(upstreamText))
        defer { gateway.stop() }

        let count = 5000
        let descriptorsBefore = openDescriptors()
        var clients: [TestSocket] = []
        clients.reserveCapacity(count)
        defer { for c in clients { c.close() } }
        for i in 0..<count {
            let c = try TestSocket.connect(gateway.address)
            c.setReceiveTimeout(seconds: 10)
            let b = UInt8(truncatingIfNeeded: i)
            c.write([b])
            #expect(try c.readExactly(1) == [b])
            clients.append(c)
        }
        #expect(gateway.active == Int64(count))
        // Idle bridges hold their two sockets and nothing else: no pipe even in splice mode
        // (a pipe is borrowed only while bytes are in it), a bounded cache of idle pipes aside.
        #expect(gateway.eventually { gateway.server.total(.pipesInUse) == 0 })
        let gatewayDescriptors = openDescriptors() - descriptorsBefore - count
        #expect(gatewayDescriptors <= 2 * count + 64, "\(gatewayDescriptors) descriptors for \(count) bridges")
        // Held: every bridge still answers.
        for (i, c) in clients.enumerated() {
            let b = UInt8(truncatingIfNeeded: i &+ 1)
            c.write([b])
            #expect(try c.readExactly(1) == [b])
        }
        for c in clients { c.close() }
        clients.removeAll()
        #expect(gateway.eventually(seconds: 30) { gateway.active == 0 }, "active=\(gateway.active)")
        #expect(gateway.server.total(.acceptedTotal) == Int64(count))
        #expect(gateway.server.total(.buffersInUse) == 0)
    }
}

/// Descriptors open in this process.
func openDescriptors() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
}
