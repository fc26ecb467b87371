import Foundation
import Glibc
import IgrisEngine
import Testing

/// igris-load's own checks must be able to fail: its verified duplex mode reports intact
/// bytes through igris (both backends, plain and through the SOCKS5 listener) and catches a
/// single flipped byte.
@Suite("igris-load", .serialized)
struct LoadGeneratorTests {
    let load = productPath("igris-load")

    @Test("bulk --duplex verifies every byte through igris, directly and through SOCKS5", arguments: engineBackends)
    func duplexVerified(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let forward = try Gateway(backend: backend, upstream: upstream.address)
        defer { forward.stop() }
        let socks = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(upstream.address.port)"])
        defer { socks.stop() }
        for arguments in [["--connect", "\(forward.address)"], ["--connect", "\(upstream.address)", "--socks5", "\(socks.socks5)"]] {
            let child = try ChildProcess(load, ["bulk", "--duplex", "--connections", "4", "--duration", "1", "--json"] + arguments)
            let line = child.readLine()
            let (status, stderr) = child.finish()
            #expect(status == 0, "\(stderr)")
            #expect(line.contains("\"verified\":true"), "\(line)")
        }
    }

    @Test("bulk --duplex catches one flipped byte and exits 1")
    func duplexCatchesCorruption() throws {
        let corrupting = try TestUpstream { socket in
            var buffer = [UInt8](repeating: 0, count: 65536)
            var total = 0
            while true {
                let n = buffer.withUnsafeMutableBytes { socket.read(into: $0) }
                if n <= 0 { break }
                if total <= 100_000 && 100_000 < total + n { buffer[100_000 - total] ^= 0x01 }
                total += n
                socket.write(Array(buffer[0..<n]))
            }
            socket.close()
        }
        defer { corrupting.stop() }
        let child = try ChildProcess(load, ["bulk", "--duplex", "--duration", "0.5", "--json", "--connect", "\(corrupting.address)"])
        let line = child.readLine()
        let (status, _) = child.finish()
        #expect(status == 1)
        #expect(line.contains("\"verified\":false"), "\(line)")
    }

    @Test("rr, churn and hold through the SOCKS5 listener report sane numbers")
    func clientModes() throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let socks = try ProxyGateway(backend: .ioUring, allow: ["127.0.0.1/32:\(upstream.address.port)"])
        defer { socks.stop() }
        let via = ["--connect", "\(upstream.address)", "--socks5", "\(socks.socks5)"]
        let rr = try ChildProcess(load, ["rr", "--count", "500", "--json"] + via)
        let rrLine = rr.readLine()
        #expect(rr.finish().status == 0)
        #expect(rrLine.contains("\"round_trips\":500"), "\(rrLine)")
        let churn = try ChildProcess(load, ["churn", "--duration", "0.5", "--json"] + via)
        let churnLine = churn.readLine()
        #expect(churn.finish().status == 0)
        #expect(churnLine.contains("\"failures\":0"), "\(churnLine)")
        let hold = try ChildProcess(load, ["hold", "--connections", "300", "--hold", "0"] + via)
        #expect(hold.readLine() == "hold open=300")
        #expect(hold.readLine() == "hold verified=300 of=300")
        #expect(hold.finish().status == 0)
    }
}
