import Foundation
import Glibc
import IgrisEngine
import Testing

/// Faults a VPN backend meets in production: slow clients holding handshakes open, and many
/// busy connections over a starved buffer pool.
@Suite("Faults", .serialized)
struct FaultTests {
    @Test("slowloris: 2,000 SOCKS5 greetings dripped a byte a second are closed at the handshake timeout; curl still gets through",
          arguments: engineBackends)
    func slowloris(backend: BackendChoice) throws {
        let files = try FileServer(size: 500_000)
        defer { files.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(files.port)"], handshakeTimeout: 2_000_000_000)
        defer { gateway.stop() }
        // Greetings offering 255 methods: 257 bytes, so at a byte a second none completes.
        var slow: [TestSocket] = []
        for _ in 0..<2000 {
            let s = try TestSocket.connect(gateway.socks5)
            s.write([5])
            slow.append(s)
        }
        let sockets = slow
        let stop = SharedCounter()
        let dripper = TestThread {
            for _ in 0..<4 where stop.value == 0 {
                usleep(1_000_000)  // the attack's own pace, not a synchronisation
                for s in sockets { s.write([255]) }
            }
        }
        // Meanwhile a real client is served, within curl's own 5 s budget.
        let fetch = try curl(["--max-time", "5", "--socks5-hostname", "\(gateway.socks5)", "http://localhost:\(files.port)/blob"])
        #expect(fetch.status == 0 && fetch.digest == files.digest, "\(fetch.stderr)")
        // Every dripping connection is closed by the gateway at its timeout.
        var closed = 0
        for s in slow {
            s.setReceiveTimeout(seconds: 10)
            if s.readOneByte() <= 0 { closed += 1 }
        }
        stop.add(1)
        dripper.join()
        for s in slow { s.close() }
        #expect(closed == 2000)
        #expect(gateway.total(.handshakeTimeouts) == 2000)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("a 2-buffer pool under 2,000 busy connections: every flow progresses and arrives intact", arguments: engineBackends)
    func starvedPool(backend: BackendChoice) throws {
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0", "--threads", "2"])
        defer { echo.terminate() }
        let upstream = try SocketAddress.resolve(String(try #require(echo.readLine().split(separator: " ").last)))
        let gateway = try Gateway(backend: backend, splice: .never, upstream: upstream, workers: 2) {
            $0.buffers = BackendConfiguration(bufferSize: 4096, bufferCount: 2)
        }
        defer { gateway.stop() }
        let size = 16 * 1024
        var sockets: [TestSocket] = []
        var digests: [[UInt8]] = []
        // Every connection's bytes go out at once (the socket buffers hold them), so all 2,000
        // compete for the two buffers; then each echo is read back in turn.
        for i in 0..<2000 {
            let s = try TestSocket.connect(gateway.address)
            s.setReceiveTimeout(seconds: 60)
            s.setSendTimeout(seconds: 60)
            digests.append(sendPattern(s, seed: UInt64(i), count: size, chunk: size).digest)
            s.shutdownWrite()
            sockets.append(s)
        }
        var intact = 0
        for (i, s) in sockets.enumerated() {
            let r = receiveDigest(s)
            if r.error == nil && r.received == size && r.digest == digests[i] { intact += 1 }
            s.close()
        }
        #expect(intact == 2000)
        #expect(gateway.server.total(.bufferExhaustions) > 0, "the pool really ran dry")
        #expect(gateway.eventually { gateway.active == 0 })
    }

    @Test("a tiny completion queue overflows and no completion is lost")
    func completionQueueOverflow() throws {
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0", "--threads", "2"])
        defer { echo.terminate() }
        let upstream = try SocketAddress.resolve(String(try #require(echo.readLine().split(separator: " ").last)))
        // 2 SQ entries, 16 CQ entries, for 200 connections moving data at once.
        let gateway = try Gateway(backend: .ioUring, splice: .never, upstream: upstream, workers: 1) {
            $0.buffers = BackendConfiguration(bufferSize: 4096, bufferCount: 256, ringEntries: 2)
        }
        defer { gateway.stop() }
        let ok = SharedCounter()
        let clients = (0..<200).map { i in
            TestThread {
                guard let s = try? TestSocket.connect(gateway.address) else { return }
                s.setReceiveTimeout(seconds: 30)
                var good = true
                for k in 0..<50 {
                    let message = [UInt8](repeating: UInt8(truncatingIfNeeded: i &+ k), count: 3000)
                    s.write(message)
                    if (try? s.readExactly(3000)) != message { good = false; break }
                }
                s.close()
                if good { ok.add(1) }
            }
        }
        for c in clients { c.join() }
        #expect(ok.value == 200, "every connection's 50 round trips came back intact")
        #expect(gateway.server.total(.completionOverflows) > 0, "the completion queue really overflowed")
        #expect(gateway.eventually { gateway.active == 0 })
    }
}
