import ArgumentParser
import CLinux
import Glibc
import Histogram
import IgrisEngine
import IgrisPolicy

/// Load modes for thousands of connections from a few threads (epoll), for the pressure
/// benchmarks: `busy` (every connection ping-pongs at once), `slow` (clients that read
/// slowly or not at all) and `openloop` (connects at a fixed rate, whatever is served).

/// Sets O_NONBLOCK on a connected socket.
private func makeNonBlocking(_ fd: Int32) {
    _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
}

private func epollAdd(_ ep: Int32, _ fd: Int32, _ events: UInt32, _ data: UInt64) {
    var e = epoll_event(events: events, data: epoll_data_t(u64: data))
    _ = epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e)
}

/// Every connection sends `--size` bytes, waits for them back, and again, for `--duration`.
/// Reports ops/s, latency percentiles and the spread of per-connection operation counts
/// (the slowest connection against the median: fairness).
struct Busy: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Ping-pong on many connections at once (epoll); ops/s, percentiles, fairness.")

    @Option(help: "Target HOST:PORT (an echo server, or a proxy in front of one).") var connect: String
    @Option(help: "Connections, all busy at once.") var connections: Int = 1000
    @Option(help: "Client threads (each an epoll loop over its share).") var threads: Int = 1
    @Option(help: "Bytes per request.") var size: Int = 64
    @Option(help: "Seconds to run.") var duration: Double = 5
    @Flag(help: "One JSON object instead of a line of text.") var json = false

    func run() throws {
        guard connections >= 1, connections <= 100_000, threads >= 1, threads <= 64, size >= 1, size <= 65536,
              duration > 0, duration <= 600 else { throw ValidationError("an option is out of range") }
        let route = ConnectRoute(dial: try resolveTarget(connect), handshake: .none)
        var fds: [Int32] = []
        for i in 0..<connections {
            let s = try route.open(sourceIndex: i)
            makeNonBlocking(s.fd)
            fds.append(s.fd)
        }
        let perThread = (connections + threads - 1) / threads
        let size = self.size
        let deadline = Syscall.monotonicNanoseconds() + UInt64(duration * 1e9)
        let results = Locked<[(Histogram<UInt64>, [Int])]>([])
        let all = fds
        let start = Syscall.monotonicNanoseconds()
        onThreads(threads) { t in
            let mine = Array(all[min(all.count, t * perThread)..<min(all.count, (t + 1) * perThread)])
            var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
            var ops = [Int](repeating: 0, count: mine.count)
            var got = [Int](repeating: 0, count: mine.count)
            var sentAt = [UInt64](repeating: 0, count: mine.count)
            let ep = epoll_create1(0)
            let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            let back = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            defer { out.deallocate(); back.deallocate(); Glibc.close(ep) }
            memset(out, 0x5A, size)
            for (k, fd) in mine.enumerated() {
                epollAdd(ep, fd, UInt32(EPOLLIN.rawValue), UInt64(k))
                sentAt[k] = Syscall.monotonicNanoseconds()
                _ = Syscall.send(fd, out, size)
            }
            let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: 512)
            defer { events.deallocate() }
            while Syscall.monotonicNanoseconds() < deadline {
                let n = epoll_wait(ep, events, 512, 100)
                if n <= 0 { continue }
                for e in 0..<Int(n) {
                    let k = Int(events[e].data.u64)
                    let r = Syscall.recv(mine[k], back, size - got[k])
                    if r <= 0 { continue }
                    got[k] += r
                    guard got[k] == size else { continue }
                    let now = Syscall.monotonicNanoseconds()
                    _ = histogram.record(now - sentAt[k])
                    ops[k] += 1
                    got[k] = 0
                    sentAt[k] = now
                    _ = Syscall.send(mine[k], out, size)
                }
            }
            results.withLock { $0.append((histogram, ops)) }
        }
        let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
        for fd in fds { Glibc.close(fd) }
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var counts: [Int] = []
        results.withLock { for (h, o) in $0 { histogram.add(h); counts += o } }
        counts.sort()
        guard histogram.totalCount > 0, let slowest = counts.first else { throw ValidationError("no round trip completed") }
        let median = counts[counts.count / 2]
        func pct(_ p: Double) -> Double { Double(histogram.valueAtPercentile(p)) / 1000 }
        let opsPerSecond = Double(histogram.totalCount) / elapsed
        let spread = slowest > 0 ? Double(median) / Double(slowest) : Double.infinity
        if json {
            print("{\"mode\":\"busy\",\"connections\":\(connections),\"ops_per_s\":\(opsPerSecond),\"p50_us\":\(pct(50)),\"p99_us\":\(pct(99)),\"p999_us\":\(pct(99.9)),\"slowest_ops\":\(slowest),\"median_ops\":\(median),\"median_over_slowest\":\(spread.isFinite ? spread : -1)}")
        } else {
            printTable([("mode", "busy"), ("connections", "\(connections)"), ("ops/s", "\(Int(opsPerSecond))"), ("p50 µs", String(format2: pct(50))),
                        ("p99 µs", String(format2: pct(99))), ("p99.9 µs", String(format2: pct(99.9))),
                        ("slowest ops", "\(slowest)"), ("median ops", "\(median)")])
        }
    }
}

/// Clients that read slowly (`--read-rate` bytes/s each) or not at all (0), each pushing
/// `--push` bytes to an echo server meanwhile: the echo piles up on the way back.
struct Slow: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Slow readers: push to an echo server, read back at a trickle, for --duration.")

    @Option(help: "Target HOST:PORT (an echo server, or a proxy in front of one).") var connect: String
    @Option(help: "Slow connections.") var connections: Int = 100
    @Option(help: "Bytes each connection sends (as fast as it is taken).") var push: Int = 4 << 20
    @Option(name: .customLong("read-rate"), help: "Bytes per second each connection reads (0: none).") var readRate: Int = 1024
    @Option(help: "Seconds to run.") var duration: Double = 10
    @Option(name: .customLong("receive-buffer"), help: "SO_RCVBUF of each client (a phone's small window).") var receiveBuffer: Int = 16384

    func run() throws {
        guard connections >= 1, connections <= 100_000, push >= 0, readRate >= 0, duration > 0, duration <= 3600 else {
            throw ValidationError("an option is out of range")
        }
        let target = try resolveTarget(connect)
        var fds: [Int32] = []
        for i in 0..<connections {
            let fd = try Syscall.streamSocket(family: target.family, nonBlocking: false)
            var size = Int32(receiveBuffer)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            if target.family == AF_INET, target.ipAddress.description.hasPrefix("127.") {
                try? Syscall.bind(fd, SocketAddress(ip: IPAddress(ipv4: 127, 0, 0, UInt8(1 + i % 250)), port: 0))
            }
            let rc = target.withSockAddr { Glibc.connect(fd, $0, $1) }
            if rc != 0 { Glibc.close(fd); throw SyscallError("connect \(target)", errno: errno) }
            makeNonBlocking(fd)
            fds.append(fd)
        }
        print("slow open=\(connections)")
        fflush(nil)
        let chunk = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 16)
        defer { chunk.deallocate() }
        memset(chunk, 0x33, 65536)
        var pushed = [Int](repeating: 0, count: connections)
        var read = 0
        let tick = 0.1
        let perTick = Int(Double(readRate) * tick)
        let deadline = Syscall.monotonicNanoseconds() + UInt64(duration * 1e9)
        while Syscall.monotonicNanoseconds() < deadline {
            for (k, fd) in fds.enumerated() {
                while pushed[k] < push {
                    let n = Syscall.send(fd, chunk, min(65536, push - pushed[k]))
                    if n <= 0 { break }
                    pushed[k] += n
                }
                if perTick > 0 {
                    let n = Syscall.recv(fd, chunk, min(65536, perTick))
                    if n > 0 { read += n }
                }
            }
            var ts = timespec(tv_sec: 0, tv_nsec: Int(tick * 1e9))
            nanosleep(&ts, nil)
        }
        for fd in fds { Syscall.setLingerZero(fd); Glibc.close(fd) }
        print("slow pushed=\(pushed.reduce(0, +)) read=\(read)")
    }
}

/// Connects at a fixed rate for `--duration`, whether or not earlier ones were served: each
/// sends 64 bytes, waits for the echo, and closes (RST, so no TIME_WAIT piles up). Counts what
/// was served, reset, refused and what timed out — goodput under overload.
struct OpenLoop: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "openloop", abstract: "Connects at a fixed rate (open loop); served, reset, timed out.")

    @Option(help: "Target HOST:PORT (an echo server, or a proxy in front of one).") var connect: String
    @Option(help: "New connections per second.") var rate: Int = 10000
    @Option(help: "Seconds to run.") var duration: Double = 5
    @Option(help: "Seconds a connection may take before it counts as timed out.") var timeout: Double = 2
    @Option(name: .customLong("max-in-flight"), help: "Connections in flight at most (descriptors); past it, a start is skipped.") var maxInFlight: Int = 15000
    @Flag(help: "One JSON object instead of a line of text.") var json = false

    func run() throws {
        guard rate >= 1, rate <= 1_000_000, duration > 0, duration <= 600, timeout > 0, maxInFlight >= 1 else {
            throw ValidationError("an option is out of range")
        }
        let target = try resolveTarget(connect)
        let ep = epoll_create1(0)
        defer { Glibc.close(ep) }
        struct Attempt { var started: UInt64 = 0; var got = 0; var sent = false; var live = false }
        var attempts = [Attempt](repeating: Attempt(), count: 1 << 17)
        var inFlight = 0
        var started = 0, served = 0, resets = 0, refused = 0, closed = 0, timedOut = 0, skipped = 0
        let message = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 16)
        let back = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 16)
        defer { message.deallocate(); back.deallocate() }
        memset(message, 0x61, 64)
        let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: 1024)
        defer { events.deallocate() }
        let begin = Syscall.monotonicNanoseconds()
        let end = begin + UInt64(duration * 1e9)
        let limit = UInt64(timeout * 1e9)
        var sweepAt = begin

        func finish(_ fd: Int32) {
            attempts[Int(fd)].live = false
            inFlight -= 1
            Syscall.setLingerZero(fd)
            Glibc.close(fd)
        }

        while true {
            let now = Syscall.monotonicNanoseconds()
            if now >= end && inFlight == 0 { break }
            if now >= end + limit + 1_000_000_000 { break }
            // Starts due by now (the schedule, not the replies, sets the pace).
            let due = now < end ? Int(Double(now - begin) / 1e9 * Double(rate)) : started + skipped
            while started + skipped < due {
                if inFlight >= maxInFlight { skipped += 1; continue }
                guard let fd = try? Syscall.streamSocket(family: target.family) else { skipped += 1; continue }
                if Int(fd) >= attempts.count { Glibc.close(fd); skipped += 1; continue }
                if target.family == AF_INET, target.ipAddress.description.hasPrefix("127.") {
                    try? Syscall.bind(fd, SocketAddress(ip: IPAddress(ipv4: 127, 0, 0, UInt8(2 + (started % 240))), port: 0))
                }
                let rc = target.withSockAddr { Glibc.connect(fd, $0, $1) }
                if rc != 0 && errno != EINPROGRESS {
                    refused += 1
                    Glibc.close(fd)
                    started += 1
                    continue
                }
                attempts[Int(fd)] = Attempt(started: now, got: 0, sent: false, live: true)
                epollAdd(ep, fd, UInt32(EPOLLIN.rawValue | EPOLLOUT.rawValue | EPOLLRDHUP.rawValue), UInt64(fd))
                inFlight += 1
                started += 1
            }
            let n = epoll_wait(ep, events, 1024, 1)
            for e in 0..<Int(max(0, n)) {
                let fd = Int32(events[e].data.u64)
                guard attempts[Int(fd)].live else { continue }
                let ev = events[e].events
                if ev & UInt32(EPOLLERR.rawValue) != 0 {
                    var err: Int32 = 0
                    var len = socklen_t(4)
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
                    if err == ECONNREFUSED { refused += 1 } else { resets += 1 }
                    finish(fd)
                    continue
                }
                if !attempts[Int(fd)].sent && ev & UInt32(EPOLLOUT.rawValue) != 0 {
                    attempts[Int(fd)].sent = Syscall.send(fd, message, 64) == 64
                }
                if ev & UInt32(EPOLLIN.rawValue | EPOLLRDHUP.rawValue) != 0 {
                    let r = Syscall.recv(fd, back, 64 - attempts[Int(fd)].got)
                    if r > 0 {
                        attempts[Int(fd)].got += r
                        if attempts[Int(fd)].got == 64 { served += 1; finish(fd) }
                    } else if r == 0 {
                        closed += 1  // closed without an answer (e.g. the upstream refused the proxy)
                        finish(fd)
                    } else if r != -Int(EAGAIN) {
                        if r == -Int(ECONNREFUSED) { refused += 1 } else { resets += 1 }
                        finish(fd)
                    }
                }
            }
            if now >= sweepAt {
                sweepAt = now + 50_000_000
                for fd in attempts.indices where attempts[fd].live && now - attempts[fd].started > limit {
                    timedOut += 1
                    finish(Int32(fd))
                }
            }
        }
        let seconds = Double(Syscall.monotonicNanoseconds() - begin) / 1e9
        let goodput = Double(served) / duration
        if json {
            print("{\"mode\":\"openloop\",\"rate\":\(rate),\"started\":\(started),\"served\":\(served),\"served_per_s\":\(goodput),\"resets\":\(resets),\"refused\":\(refused),\"closed\":\(closed),\"timeouts\":\(timedOut),\"skipped\":\(skipped),\"seconds\":\(seconds)}")
        } else {
            printTable([("mode", "openloop"), ("rate", "\(rate)"), ("started", "\(started)"), ("served", "\(served)"),
                        ("served/s", "\(Int(goodput))"), ("resets", "\(resets)"), ("refused", "\(refused)"), ("closed", "\(closed)"),
                        ("timeouts", "\(timedOut)"), ("skipped", "\(skipped)")])
        }
    }
}
