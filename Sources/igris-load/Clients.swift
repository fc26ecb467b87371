import ArgumentParser
import Glibc
import IgrisPolicy
import Histogram
import IgrisEngine
import Synchronization

/// A blocking TCP client socket for the load modes.
struct ClientSocket: Sendable {
    let fd: Int32
    /// `--tls`: what is written and read goes through this session.
    var tls: TLSConnection? = nil

    /// `source`: bind here first (a loopback address of its own gives the connection a fresh
    /// 64K-port range, so tens of thousands of connections to one target don't run out).
    init(_ address: SocketAddress, source: SocketAddress? = nil) throws {
        fd = try Syscall.streamSocket(family: address.family, nonBlocking: false)
        if let source {
            do { try Syscall.bind(fd, source) } catch { Glibc.close(fd); throw error }
        }
        let rc = address.withSockAddr { Glibc.connect(fd, $0, $1) }
        if rc != 0 {
            let e = errno
            Glibc.close(fd)
            throw SyscallError("connect \(address)", errno: e)
        }
        try Syscall.setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
    }

    func writeAll(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
        if let tls { return tls.writeAll(p, count) }
        var off = 0
        while off < count {
            let n = Syscall.send(fd, p + off, count - off)
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    func readExactly(_ p: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        if let tls { return tls.readExactly(p, count) }
        var off = 0
        while off < count {
            let n = Syscall.recv(fd, p + off, count - off)
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    func close() {
        tls?.finish()
        Glibc.close(fd)
    }
}

/// The default output: a header row and a value row, columns aligned.
func printTable(_ columns: [(String, String)]) {
    let widths = columns.map { max($0.0.count, $0.1.count) }
    func row(_ cells: [String]) -> String {
        var line = zip(cells, widths).map { $0 + String(repeating: " ", count: $1 - $0.count) }.joined(separator: "  ")
        while line.hasSuffix(" ") { line.removeLast() }
        return line
    }
    print(row(columns.map(\.0)))
    print(row(columns.map(\.1)))
}

/// Progress and diagnostics go to stderr, never into the results on stdout.
func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)
    _ = Glibc.write(2, &bytes, bytes.count)
}

func resolveTarget(_ text: String) throws -> SocketAddress {
    do { return try SocketAddress.resolve(text) } catch { throw ValidationError(error.description) }
}

/// A running total the worker threads add to and a reporter prints once a second on stderr
/// (only for runs longer than a few seconds; results stay alone on stdout).
final class Progress: Sendable {
    private let total = Atomic<Int>(0)
    private let stopped = Atomic<Bool>(false)

    func add(_ n: Int) { total.wrappingAdd(n, ordering: .relaxed) }
    var value: Int { total.load(ordering: .relaxed) }

    /// Starts the reporter when `seconds` is long enough to want one; `line` formats
    /// (elapsed seconds, running total).
    func report(every seconds: Double, whenLongerThan duration: Double, _ line: @escaping @Sendable (Double, Int) -> String) {
        guard duration > 3 else { return }
        let start = Syscall.monotonicNanoseconds()
        Thread.detach { [self] in
            var next = 1.0
            while !stopped.load(ordering: .relaxed) {
                var ts = timespec(tv_sec: 0, tv_nsec: 100_000_000)
                nanosleep(&ts, nil)
                let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
                if elapsed >= next {
                    writeStandardError(line(elapsed, value) + "\n")
                    next += seconds
                }
            }
        }
    }

    func stop() { stopped.store(true, ordering: .relaxed) }
}

enum Thread {
    static func detach(_ body: @escaping @Sendable () -> Void) {
        final class Box { let run: () -> Void; init(_ r: @escaping () -> Void) { run = r } }
        var t = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        pthread_create(&t, nil, { raw in Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().run(); return nil }, box)
        pthread_detach(t)
    }
}

/// Runs `body(i)` on `count` threads and waits for all.
func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    final class Box { let run: () -> Void; init(_ r: @escaping () -> Void) { run = r } }
    var threads: [pthread_t] = []
    for i in 0..<count {
        var t = pthread_t()
        let box = Unmanaged.passRetained(Box { body(i) }).toOpaque()
        pthread_create(&t, nil, { raw in Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().run(); return nil }, box)
        threads.append(t)
    }
    for t in threads { pthread_join(t, nil) }
}

/// Bulk transfer: one-way to a sink, or `--duplex` to an echo server with every byte that
/// comes back checked against what was sent. Gbit/s.
struct Bulk: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Send as fast as possible for --duration; report Gbit/s (--duplex: verified).")

    @Option(help: "Target HOST:PORT (a sink, or with --duplex an echo server; or a proxy in front of one).") var connect: String
    @OptionGroup var proxy: ProxyOptions
    @Option(help: "Parallel connections.") var connections: Int = 1
    @Option(help: "Seconds to send.") var duration: Double = 5
    @Option(help: "Bytes per write.") var chunk: Int = 256 * 1024
    @Flag(help: "Full duplex through an echo server: read everything back and verify it byte for byte.") var duplex = false
    @Flag(help: "One JSON object instead of a line of text.") var json = false

    func run() throws {
        let route = try proxy.route(to: connect)
        if duplex && proxy.tls.tls { throw ValidationError("--duplex with --tls: one thread per direction can't share a TLS session; use a sink") }
        guard duration > 0, duration <= 600, connections >= 1, connections <= 10000 else {
            throw ValidationError("--duration must be in (0, 600] and --connections in [1, 10000]")
        }
        guard chunk >= 4096, chunk <= 16 << 20, chunk % 8 == 0 else { throw ValidationError("--chunk must be a multiple of 8 from 4096 to 16777216") }
        let sockets = try (0..<connections).map { _ in try route.open() }
        let sent = Progress()
        let received = Progress()
        let corrupt = Atomic<Int>(0)
        let start = Syscall.monotonicNanoseconds()
        let deadline = start + UInt64(duration * 1e9)
        let chunk = self.chunk
        let duplex = self.duplex
        sent.report(every: 1, whenLongerThan: duration) { t, bytes in
            "bulk: \(Int(t)) s, \(String(format2: Double(bytes) * 8 / t / 1e9)) Gbit/s sent"
        }
        // Threads 0..<n write; with --duplex, threads n..<2n read back and verify.
        onThreads(duplex ? 2 * connections : connections) { i in
            let c = i % connections
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 64)
            defer { buffer.deallocate() }
            var block: UInt64 = 0
            if i < connections {
                if !duplex { memset(buffer, 0x5a, chunk) }
                while Syscall.monotonicNanoseconds() < deadline {
                    if duplex { BulkPattern.fill(buffer, chunk, connection: c, block: block) }
                    if !sockets[c].writeAll(buffer, chunk) { break }
                    block += 1
                    sent.add(chunk)
                }
                if duplex { _ = Glibc.shutdown(sockets[c].fd, Int32(SHUT_WR)) }
            } else {
                while sockets[c].readExactly(buffer, chunk) {
                    if !BulkPattern.check(buffer, chunk, connection: c, block: block) { corrupt.wrappingAdd(1, ordering: .relaxed) }
                    block += 1
                    received.add(chunk)
                }
            }
        }
        sent.stop()
        let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
        for s in sockets { s.close() }
        let bytes = sent.value
        let back = received.value
        let gbps = Double(duplex ? bytes + back : bytes) * 8 / elapsed / 1e9
        let bad = corrupt.load(ordering: .relaxed)
        let verified = duplex ? (back == bytes && bad == 0) : false
        if json {
            print("{\"mode\":\"bulk\",\"connections\":\(connections),\"duplex\":\(duplex),\"bytes\":\(bytes),\"bytes_back\":\(back),\"verified\":\(verified),\"seconds\":\(elapsed),\"gbps\":\(gbps)}")
        } else {
            var columns = [("mode", duplex ? "bulk duplex" : "bulk"), ("connections", "\(connections)"), ("bytes sent", "\(bytes)"),
                           ("seconds", String(format2: elapsed)), ("Gbit/s", String(format2: gbps))]
            if duplex { columns += [("bytes back", "\(back)"), ("corrupt blocks", "\(bad)"), ("verified", "\(verified)")] }
            printTable(columns)
        }
        if duplex && !verified { throw ExitCode(1) }
    }
}

/// What `bulk --duplex` sends: each 8-byte word is a function of connection, block and
/// position, so a reader knows what every byte it gets back must be (a swapped, lost or
/// repeated block shows up, not just a flipped bit).
enum BulkPattern {
    @inline(__always)
    static func word(_ connection: Int, _ block: UInt64, _ k: Int) -> UInt64 {
        var x = UInt64(connection) &* 0x9E37_79B9_7F4A_7C15 ^ block &* 0xBF58_476D_1CE4_E5B9 ^ UInt64(k)
        x ^= x >> 31
        return x &* 0x94D0_49BB_1331_11EB
    }

    static func fill(_ p: UnsafeMutableRawPointer, _ count: Int, connection: Int, block: UInt64) {
        let words = p.assumingMemoryBound(to: UInt64.self)
        for k in 0..<(count / 8) { words[k] = word(connection, block, k) }
    }

    static func check(_ p: UnsafeMutableRawPointer, _ count: Int, connection: Int, block: UInt64) -> Bool {
        let words = p.assumingMemoryBound(to: UInt64.self)
        for k in 0..<(count / 8) where words[k] != word(connection, block, k) { return false }
        return true
    }
}

/// Request/response of --size bytes against an echo server: ops/s and latency percentiles
/// (HdrHistogram, 3 significant digits).
struct PingPong: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "rr", abstract: "Request/response against an echo server; latency percentiles.")

    @Option(help: "Target HOST:PORT (an echo server, or a proxy in front of one).") var connect: String
    @OptionGroup var proxy: ProxyOptions
    @Option(help: "Bytes per request (echoed back).") var size: Int = 64
    @Option(help: "Round trips per connection.") var count: Int = 20000
    @Option(help: "Parallel connections.") var connections: Int = 1
    @Flag(help: "One JSON object instead of a line of text.") var json = false

    func run() throws {
        let route = try proxy.route(to: connect)
        guard count >= 1, count <= 10_000_000, size >= 1, size <= 1 << 20, connections >= 1, connections <= 1000 else {
            throw ValidationError("--count, --size or --connections out of range")
        }
        let sockets = try (0..<connections).map { _ in try route.open() }
        let perConnection = count
        let size = self.size
        let histograms = Locked<[Histogram<UInt64>]>([])
        let done = Progress()
        let start = Syscall.monotonicNanoseconds()
        let expected = Double(count)
        done.report(every: 1, whenLongerThan: expected / 10_000) { t, n in "rr: \(Int(t)) s, \(n) round trips" }
        onThreads(connections) { i in
            // Nanoseconds up to 60 s; each thread records into its own, merged at the end.
            var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
            let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            let back = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            defer { out.deallocate(); back.deallocate() }
            memset(out, 0x42, size)
            for _ in 0..<perConnection {
                let t0 = Syscall.monotonicNanoseconds()
                guard sockets[i].writeAll(out, size), sockets[i].readExactly(back, size) else { break }
                _ = histogram.record(Syscall.monotonicNanoseconds() - t0)
                done.add(1)
            }
            histograms.withLock { $0.append(histogram) }
        }
        done.stop()
        let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
        for so in sockets { so.close() }
        var all = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        histograms.withLock { for h in $0 { all.add(h) } }
        guard all.totalCount > 0 else { throw ValidationError("no round trip completed") }
        func pct(_ p: Double) -> Double { Double(all.valueAtPercentile(p)) / 1000 }
        let ops = Double(all.totalCount) / elapsed
        if json {
            print("{\"mode\":\"rr\",\"size\":\(size),\"round_trips\":\(all.totalCount),\"ops_per_s\":\(ops),\"p50_us\":\(pct(50)),\"p90_us\":\(pct(90)),\"p99_us\":\(pct(99)),\"p999_us\":\(pct(99.9))}")
        } else {
            printTable([("mode", "rr"), ("size", "\(size)"), ("round trips", "\(all.totalCount)"), ("ops/s", "\(Int(ops))"),
                        ("p50 µs", String(format2: pct(50))), ("p90 µs", String(format2: pct(90))), ("p99 µs", String(format2: pct(99))),
                        ("p99.9 µs", String(format2: pct(99.9)))])
        }
    }
}

/// Open N connections, verify each with a 1-byte echo, hold, verify again, close. With
/// --echo-every, every connection echoes once per interval while held, and one the server
/// closes (at a drain deadline, say) is counted, not an error.
struct Hold: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Open and hold connections, each verified by a 1-byte echo.")

    @Option(help: "Target HOST:PORT (an echo server, or a proxy in front of one).") var connect: String
    @OptionGroup var proxy: ProxyOptions
    @Option(help: "Connections to open.") var connections: Int = 1000
    @Option(help: "Seconds to hold them open.") var hold: Double = 5
    @Option(name: .customLong("echo-every"), help: "While held, echo a byte on each connection this often (seconds).")
    var echoEvery: Double?

    func run() throws {
        let route = try proxy.route(to: connect)
        guard connections >= 1, connections <= 100_000, hold >= 0, hold <= 3600 else { throw ValidationError("--connections or --hold out of range") }
        if let echoEvery, echoEvery < 0.01 || echoEvery > 3600 { throw ValidationError("--echo-every must be between 0.01 and 3600 seconds") }
        var sockets: [ClientSocket] = []
        var byte: UInt8 = 7
        for i in 0..<connections {
            if i > 0 && i % 5000 == 0 { writeStandardError("hold: \(i) of \(connections) open\n") }
            let s = try route.open(sourceIndex: i)
            guard s.writeAll(&byte, 1), s.readExactly(&byte, 1) else { throw ValidationError("echo failed on a fresh connection") }
            sockets.append(s)
        }
        print("hold open=\(sockets.count)")
        fflush(nil)
        if let echoEvery {
            try echoWhileHeld(sockets, interval: echoEvery)
            return
        }
        var ts = timespec(tv_sec: Int(hold), tv_nsec: Int((hold - Double(Int(hold))) * 1e9))
        nanosleep(&ts, nil)
        var ok = 0
        for s in sockets where s.writeAll(&byte, 1) && s.readExactly(&byte, 1) { ok += 1 }
        for s in sockets { s.close() }
        print("hold verified=\(ok) of=\(connections)")
        if ok != connections { throw ExitCode(1) }
    }

    /// Rounds of one echo per open connection. A connection the server ended (EOF, reset)
    /// is closed and counted; a wrong byte or a 5 s silence is an error.
    private func echoWhileHeld(_ sockets: [ClientSocket], interval: Double) throws {
        var open = sockets
        var echoes = 0, closedByPeer = 0, errors = 0, rounds = 0
        var closedAfterRounds: [Int] = []
        for s in open {
            var t = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(s.fd, SOL_SOCKET, SO_RCVTIMEO, &t, socklen_t(MemoryLayout<timeval>.size))
        }
        let start = Syscall.monotonicNanoseconds()
        let end = start + UInt64(hold * 1e9)
        var next = start
        while !open.isEmpty {
            next += UInt64(interval * 1e9)
            if next > end { break }
            while Syscall.monotonicNanoseconds() < next {
                var ts = timespec(tv_sec: 0, tv_nsec: Int(min(next - Syscall.monotonicNanoseconds(), 50_000_000)))
                nanosleep(&ts, nil)
            }
            rounds += 1
            var byte = UInt8(truncatingIfNeeded: rounds)
            var kept: [ClientSocket] = []
            for s in open {
                var back: UInt8 = 0
                let sent = s.writeAll(&byte, 1)
                let n = sent ? Syscall.recv(s.fd, &back, 1) : -Int(EPIPE)
                if n == 1 && back == byte {
                    echoes += 1
                    kept.append(s)
                } else if n == 0 || n == -Int(ECONNRESET) || n == -Int(EPIPE) {
                    closedByPeer += 1
                    closedAfterRounds.append(rounds - 1)
                    s.close()
                } else {
                    errors += 1
                    s.close()
                }
            }
            open = kept
        }
        for s in open { s.close() }
        let earliest = closedAfterRounds.min().map(String.init) ?? "-"
        print("hold rounds=\(rounds) echoes=\(echoes) closed_by_peer=\(closedByPeer) first_close_after_rounds=\(earliest) errors=\(errors) open_at_end=\(open.count)")
        if errors > 0 { throw ExitCode(1) }
    }
}

extension String {
    init(format2 value: Double) {
        let scaled = (value * 100).rounded() / 100
        self = "\(scaled)"
    }
}

/// Connect, one echo round trip, close — as fast as possible: connections per second.
struct Churn: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Connect, echo one byte, close, repeatedly; report connections/s.")

    @Option(help: "Target HOST:PORT (an echo server, or a proxy in front of one).") var connect: String
    @OptionGroup var proxy: ProxyOptions
    @Option(help: "Parallel client threads.") var connections: Int = 4
    @Option(help: "Seconds to run.") var duration: Double = 3
    @Flag(help: "One JSON object instead of a line of text.") var json = false

    func run() throws {
        let route = try proxy.route(to: connect)
        guard duration > 0, duration <= 600, connections >= 1, connections <= 1000 else {
            throw ValidationError("--duration must be in (0, 600] and --connections in [1, 1000]")
        }
        let done = UnsafeMutablePointer<Int>.allocate(capacity: connections)
        let failed = UnsafeMutablePointer<Int>.allocate(capacity: connections)
        let resumed = UnsafeMutablePointer<Int>.allocate(capacity: connections)
        done.initialize(repeating: 0, count: connections)
        failed.initialize(repeating: 0, count: connections)
        resumed.initialize(repeating: 0, count: connections)
        nonisolated(unsafe) let d = done
        nonisolated(unsafe) let f = failed
        nonisolated(unsafe) let r = resumed
        let start = Syscall.monotonicNanoseconds()
        let deadline = start + UInt64(duration * 1e9)
        let progress = Progress()
        progress.report(every: 1, whenLongerThan: duration) { t, n in "churn: \(Int(t)) s, \(n) connections" }
        onThreads(connections) { i in
            var byte: UInt8 = UInt8(i & 0xFF)
            while Syscall.monotonicNanoseconds() < deadline {
                let s: ClientSocket
                do {
                    s = try route.open()
                } catch {
                    if f[i] == 0 { writeStandardError("churn: \(error)\n") }
                    f[i] += 1
                    continue
                }
                if s.writeAll(&byte, 1) && s.readExactly(&byte, 1) {
                    d[i] += 1
                    if s.tls?.resumed == true { r[i] += 1 }
                    progress.add(1)
                } else {
                    if f[i] == 0 { writeStandardError("churn: echo failed: \(Errno.describe(errno))\n") }
                    f[i] += 1
                }
                s.close()
            }
        }
        progress.stop()
        let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
        let total = (0..<connections).reduce(0) { $0 + done[$1] }
        let failures = (0..<connections).reduce(0) { $0 + failed[$1] }
        let resumedTotal = (0..<connections).reduce(0) { $0 + resumed[$1] }
        let rate = Double(total) / elapsed
        if json {
            print("{\"mode\":\"churn\",\"connections\":\(total),\"failures\":\(failures),\"resumed\":\(resumedTotal),\"seconds\":\(elapsed),\"per_s\":\(rate)}")
        } else {
            printTable([("mode", "churn"), ("connections", "\(total)"), ("failures", "\(failures)"), ("seconds", String(format2: elapsed)),
                        ("connections/s", "\(Int(rate))")] + (proxy.tls.tls ? [("resumed", "\(resumedTotal)")] : []))
        }
        if total == 0 { throw ExitCode(1) }
    }
}
