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
}
