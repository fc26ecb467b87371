import Foundation
import Glibc
import IgrisEngine
import Testing

/// A mixed workload with faults against the `igris` binary, on each backend with copy and
/// splice: long bulk flows (forward and SOCKS5), idle connections, request/response, client
/// resets, an upstream that resets, the upstream process killed and restarted, a slow reader,
/// and stalled readers (connections that push into an echo and read nothing until the end:
/// more than enough to pin every buffer of the pool as igris once did, which stopped the
/// request/response flow).
/// Afterwards: every flow that ended gracefully arrived intact, nothing is left open, and the
/// process is back to its descriptors, within its RSS plus the buffer pool, and idle.
///
/// IGRIS_SOAK_SECONDS sets each combination's length (`make test`: 5, `make soak`: 60).
@Suite("Soak", .serialized)
struct SoakTests {
    static let seconds = Double(ProcessInfo.processInfo.environment["IGRIS_SOAK_SECONDS"] ?? "") ?? 3
    /// The pool below is 2 × 64 buffers; each stalled reader once pinned up to four.
    static let stalledReaders = 100
    static let stalledPush = 512 << 10

    struct Tally: Sendable {
        var intact = 0
        var corrupt = 0
        var interrupted = 0
        var bytes = 0
        var roundTrips = 0
        var resets = 0
    }

    static func status(_ pid: Int32, _ key: String) -> Int {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix(key) {
            return Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]) ?? 0
        }
        return 0
    }

    static func descriptors(_ pid: Int32) -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
    }

    /// One flow: `size` bytes out, the echo back, checked. nil: interrupted (a reset or the
    /// upstream went away); true/false: intact or not.
    static func echoFlow(_ s: TestSocket, seed: UInt64, size: Int) -> Bool? {
        s.setReceiveTimeout(seconds: 30)
        let sent = SharedBox<[UInt8]?>(nil)
        let writer = TestThread {
            let r = sendPattern(s, seed: seed, count: size, chunk: 64 * 1024)
            sent.value = r.sent == size ? r.digest : nil
            s.shutdownWrite()
        }
        let got = receiveDigest(s)
        writer.join()
        s.close()
        guard let digest = sent.value, got.error == nil, got.received == size else { return nil }
        return got.digest == digest
    }

    @Test("mixed workload with faults: intact, nothing left open, back to baseline, idle",
          arguments: [(BackendChoice.ioUring, "never"), (.ioUring, "always"), (.epoll, "never"), (.epoll, "always")])
    func soak(backend: BackendChoice, splice: String) throws {
        // No receive timeout on the stable upstream: its idle connections must outlive the run.
        let stable = try TestUpstream { socket in
            socket.setReceiveTimeout(seconds: 0)
            echo(socket)
        }
        defer { stable.stop() }
        // An upstream that resets each connection after 100 KB.
        let flaky = try TestUpstream { socket in
            var buffer = [UInt8](repeating: 0, count: 16384)
            var total = 0
            while total < 100_000 {
                let n = buffer.withUnsafeMutableBytes { socket.read(into: $0) }
                if n <= 0 { break }
                total += n
            }
            socket.reset()
        }
        defer { flaky.stop() }
        let killablePort = try unusedPort()
        func startKillable() throws -> ChildProcess {
            let c = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:\(killablePort)", "--threads", "2"])
            _ = c.readLine()
            return c
        }
        var killable = try startKillable()
        defer { killable.terminate() }
        let (fwdPort, flakyPort, socksPort) = (try unusedPort(), try unusedPort(), try unusedPort())
        let config = try writeTemporaryFile("""
            workers: 2
            backend: \(backend.rawValue)
            splice: \(splice)
            buffers: 64
            buffer_size: 16384
            drain_timeout: 5s
            acl:
              allow: ["127.0.0.1/32"]
            log: {level: warning, access_log: false}
            listeners:
              - {name: fwd, listen: "127.0.0.1:\(fwdPort)", mode: forward, upstream: "127.0.0.1:\(killablePort)"}
              - {name: flaky, listen: "127.0.0.1:\(flakyPort)", mode: forward, upstream: "\(flaky.address)"}
              - {name: socks, listen: "127.0.0.1:\(socksPort)", mode: socks5, auth: none}
            """)
        defer { unlink(config) }
        let igris = try ChildProcess(productPath("igris"), ["serve", "-c", config])
        defer { igris.terminate() }
        let pid = igris.process.processIdentifier
        #expect(waitUntilAccepting("127.0.0.1:\(socksPort)"))
        let fwd = try SocketAddress.resolve("127.0.0.1:\(fwdPort)")
        let socks = try SocketAddress.resolve("127.0.0.1:\(socksPort)")
        let flakyListener = try SocketAddress.resolve("127.0.0.1:\(flakyPort)")
        let stablePort = stable.address.port
        @Sendable func viaSocks() throws -> TestSocket {
            let (s, reply) = try Socks5Client.connect(socks, to: .ipv4(127, 0, 0, 1), port: stablePort)
            guard reply == 0 else { s.close(); throw TestFailure("SOCKS5 reply \(reply)") }
            return s
        }
        // Warm up, then the baseline.
        _ = Self.echoFlow(try viaSocks(), seed: 1, size: 1 << 20)
        _ = Self.echoFlow(try TestSocket.connect(fwd), seed: 2, size: 1 << 20)
        usleep(200_000)
        let baselineFDs = Self.descriptors(pid)
        let baselineRSS = Self.status(pid, "VmRSS:") * 1024

        let tally = SharedBox(Tally())
        let deadline = Date().addingTimeInterval(Self.seconds)
        var idle: [TestSocket] = []
        for _ in 0..<200 { idle.append(try viaSocks()) }
        var threads: [TestThread] = []
        for t in 0..<3 {  // bulk, alternating forward (killable upstream) and SOCKS5 (stable)
            threads.append(TestThread {
                var k = 0
                while Date() < deadline {
                    k += 1
                    let size = (64 << 10) << ((t + k) % 6)
                    let s = (k % 2 == 0) ? try? TestSocket.connect(fwd) : try? viaSocks()
                    guard let s else { tally.update { $0.interrupted += 1 }; usleep(10_000); continue }
                    let result = Self.echoFlow(s, seed: UInt64(t * 100_000 + k), size: size)
                    tally.update {
                        switch result {
                        case .some(true): $0.intact += 1; $0.bytes += 2 * size
                        case .some(false): $0.corrupt += 1
                        case .none: $0.interrupted += 1
                        }
                    }
                }
            })
        }
        threads.append(TestThread {  // request/response through SOCKS5
            guard let s = try? viaSocks() else { return }
            s.setReceiveTimeout(seconds: 10)
            var n: UInt8 = 0
            while Date() < deadline {
                n &+= 1
                let message = [UInt8](repeating: n, count: 64)
                s.write(message)
                guard let back = try? s.readExactly(64) else { break }
                tally.update { back == message ? ($0.roundTrips += 1) : ($0.corrupt += 1) }
            }
            s.close()
        })
        threads.append(TestThread {  // client resets mid-stream, and an upstream that resets
            var k = 0
            while Date() < deadline {
                k += 1
                if let s = try? TestSocket.connect(k % 2 == 0 ? fwd : flakyListener) {
                    s.write([UInt8](repeating: 7, count: 150_000))
                    if k % 2 == 0 { s.reset() } else { s.setReceiveTimeout(seconds: 10); _ = s.readOneByte(); s.close() }
                    tally.update { $0.resets += 1 }
                }
            }
        })
        threads.append(TestThread {  // a slow reader
            while Date() < deadline {
                guard let s = try? viaSocks() else { continue }
                s.setReceiveTimeout(seconds: 30)
                let writer = TestThread { _ = sendPattern(s, seed: 9, count: 1 << 20); s.shutdownWrite() }
                var buffer = [UInt8](repeating: 0, count: 4096)
                var got = 0
                while true {
                    let r = buffer.withUnsafeMutableBytes { s.read(into: $0) }
                    if r <= 0 { break }
                    got += r
                    usleep(500)
                }
                writer.join()
                s.close()
                tally.update { got == 1 << 20 ? ($0.intact += 1) : ($0.interrupted += 1) }
            }
        })
        threads.append(TestThread {  // stalled readers: push, read nothing until the end, then all of it
            let pattern = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.stalledPush, alignment: 16)
            defer { pattern.deallocate() }
            var stream = PatternStream(seed: 11)
            stream.fill(pattern)
            var stalled: [(socket: TestSocket, pushed: Int)] = []
            for _ in 0..<Self.stalledReaders {
                guard let s = try? viaSocks() else { tally.update { $0.interrupted += 1 }; continue }
                _ = fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) | O_NONBLOCK)
                stalled.append((s, 0))
            }
            while Date() < deadline {
                for k in stalled.indices where stalled[k].pushed < Self.stalledPush {
                    let n = Syscall.send(stalled[k].socket.fd, pattern.baseAddress! + stalled[k].pushed, Self.stalledPush - stalled[k].pushed)
                    if n > 0 { stalled[k].pushed += n }
                }
                usleep(50_000)
            }
            for (s, pushed) in stalled {
                _ = fcntl(s.fd, F_SETFL, fcntl(s.fd, F_GETFL) & ~O_NONBLOCK)
                s.setReceiveTimeout(seconds: 30)
                let rest = Array(UnsafeRawBufferPointer(rebasing: pattern[pushed...]))
                let writer = TestThread {
                    _ = s.write(rest)
                    s.shutdownWrite()
                }
                var back = [UInt8]()
                back.reserveCapacity(Self.stalledPush)
                var buffer = [UInt8](repeating: 0, count: 65536)
                while true {
                    let r = buffer.withUnsafeMutableBytes { s.read(into: $0) }
                    if r <= 0 { break }
                    back += buffer[0..<r]
                }
                writer.join()
                s.close()
                let intact = back.count == Self.stalledPush && back.withUnsafeBytes { memcmp($0.baseAddress!, pattern.baseAddress!, Self.stalledPush) == 0 }
                tally.update { intact ? ($0.intact += 1) : ($0.corrupt += 1) }
            }
        })
        // A third of the way in, the forward upstream's process is killed, then restarted.
        usleep(UInt32(Self.seconds / 3 * 1_000_000))
        killable.terminate()
        usleep(300_000)
        killable = try startKillable()
        for t in threads { t.join() }

        // The idle connections held through it all still work.
        var idleOK = 0
        for s in idle {
            s.setReceiveTimeout(seconds: 10)
            s.write([42])
            if (try? s.readExactly(1)) == [42] { idleOK += 1 }
            s.close()
        }
        let final = tally.value
        #expect(final.corrupt == 0, "corrupted flows: \(final)")
        #expect(final.intact > 10 && final.roundTrips > 100 && final.resets > 5, "\(final)")
        #expect(idleOK == 200)

        // Nothing left open: the descriptors are back to the start, except drained splice pipes
        // the workers keep for reuse (16 per worker at most, two descriptors each).
        let cachedPipes = splice == "always" ? 2 * 16 * 2 : 0
        #expect(eventually { Self.descriptors(pid) <= baselineFDs + cachedPipes && Self.descriptors(pid) >= baselineFDs - cachedPipes },
                "descriptors \(Self.descriptors(pid)) vs \(baselineFDs) at start")
        let pool = 2 * 64 * 16384
        let rss = Self.status(pid, "VmRSS:") * 1024
        #if IGRIS_SANITIZED
        // ASan keeps freed memory in quarantine and TSan shadows it: RSS says nothing there.
        #else
        #expect(rss <= baselineRSS + pool, "RSS \(rss) vs \(baselineRSS) at start + pool \(pool)")
        #endif
        let cpu0 = processCPUSeconds(pid)
        usleep(1_000_000)
        #expect(processCPUSeconds(pid) - cpu0 < 0.05, "busy after the load stopped")
        print("soak \(backend) splice=\(splice) \(Int(Self.seconds)) s: \(final.intact) intact flows, \(final.bytes >> 20) MiB echoed, "
              + "\(final.roundTrips) round trips, \(final.resets) resets, \(final.interrupted) interrupted, RSS \(baselineRSS >> 10) → \(rss >> 10) KiB, fds \(baselineFDs)")
        igris.signal(SIGTERM)
        #expect(igris.finish().status == 0)
    }
}
