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
        let gatewayDescriptors = descriptors(listeningOn: gateway.address.port, connectedTo: try SocketAddress.resolve(upstreamText).port)
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

/// An in-process gateway's descriptors, apart from whatever other tests running alongside
/// hold: its sockets (accepted on `port`, or connected to the out-of-process `upstream`
/// port) and every pipe of this process (other tests' pipes only count against it).
func descriptors(listeningOn port: UInt16, connectedTo upstream: UInt16) -> Int {
    var socketInodes = Set<Substring>()
    var pipes = 0
    let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
    var target = [CChar](repeating: 0, count: 256)
    for fd in fds {
        let n = readlink("/proc/self/fd/\(fd)", &target, target.count - 1)
        guard n > 0 else { continue }
        let link = String(decoding: target[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        if link.hasPrefix("pipe:") { pipes += 1 }
        if link.hasPrefix("socket:["), let close = link.lastIndex(of: "]") {
            socketInodes.insert(link[link.index(link.startIndex, offsetBy: 8)..<close])
        }
    }
    var sockets = 0
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        guard let text = try? String(contentsOfFile: table, encoding: .utf8) else { continue }
        for line in text.split(separator: "\n").dropFirst() {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count > 9, socketInodes.contains(f[9]) else { continue }
            let local = UInt16(f[1].split(separator: ":").last ?? "", radix: 16)
            let remote = UInt16(f[2].split(separator: ":").last ?? "", radix: 16)
            if local == port || remote == upstream { sockets += 1 }
        }
    }
    return sockets + pipes
}
