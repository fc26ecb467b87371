import ArgumentParser
import Glibc
import IgrisEngine

/// A blocking TCP client socket for the load modes.
struct ClientSocket {
    let fd: Int32

    init(_ address: SocketAddress) throws {
        fd = try Syscall.socket(family: address.family, type: Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue))
        let rc = address.withSockAddr { Glibc.connect(fd, $0, $1) }
        if rc != 0 {
            let e = errno
            Glibc.close(fd)
            throw SyscallError("connect \(address)", errno: e)
        }
        try Syscall.setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
    }

    func writeAll(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
        var off = 0
        while off < count {
            let n = Syscall.send(fd, p + off, count - off)
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    func readExactly(_ p: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        var off = 0
        while off < count {
            let n = Syscall.recv(fd, p + off, count - off)
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    func close() { Glibc.close(fd) }
}

/// Progress and diagnostics go to stderr, never into the results on stdout.
func writeStandardError(_ text: String) {
    var bytes = Array(text.utf8)
    _ = Glibc.write(2, &bytes, bytes.count)
}

func resolveTarget(_ text: String) throws -> SocketAddress {
    do { return try SocketAddress.resolve(text) } catch { throw ValidationError(error.description) }
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

/// Bulk one-way transfer to a sink (or through a proxy to one): Gbit/s.
struct Bulk: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Send as fast as possible for --duration; report Gbit/s.")

    @Option(help: "Target HOST:PORT (a sink, or a proxy in front of one).") var connect: String
    @OptionGroup var proxy: ProxyOptions
    @Option(help: "Parallel connections.") var connections: Int = 1
    @Option(help: "Seconds to send.") var duration: Double = 5
    @Option(help: "Bytes per write.") var chunk: Int = 256 * 1024
    @Flag(help: "One JSON object instead of a line of text.") var json = false

    func run() throws {
        let route = try proxy.route(to: connect)
        guard duration > 0, duration <= 600, connections >= 1, connections <= 10000 else {
            throw ValidationError("--duration must be in (0, 600] and --connections in [1, 10000]")
        }
        let sockets = try (0..<connections).map { _ in try route.open() }
        let totals = UnsafeMutablePointer<Int>.allocate(capacity: connections)
        totals.initialize(repeating: 0, count: connections)
        let start = Syscall.monotonicNanoseconds()
        let deadline = start + UInt64(duration * 1e9)
        let chunk = self.chunk
        nonisolated(unsafe) let t = totals
        onThreads(connections) { i in
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 64)
            memset(buffer, 0x5a, chunk)
            var sent = 0
            while Syscall.monotonicNanoseconds() < deadline {
                if !sockets[i].writeAll(buffer, chunk) { break }
                sent += chunk
            }
            t[i] = sent
            buffer.deallocate()
        }
        let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
        let bytes = (0..<connections).reduce(0) { $0 + totals[$1] }
        for s in sockets { s.close() }
        let gbps = Double(bytes) * 8 / elapsed / 1e9
        if json {
            print("{\"mode\":\"bulk\",\"connections\":\(connections),\"bytes\":\(bytes),\"seconds\":\(elapsed),\"gbps\":\(gbps)}")
        } else {
            print("bulk connections=\(connections) bytes=\(bytes) seconds=\(String(format2: elapsed)) gbit_per_s=\(String(format2: gbps))")
        }
    }
}

/// Request/response of --size bytes against an echo server: ops/s and latency percentiles.
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
        guard count >= 1, count <= 10_000_000, size >= 1, size <= 1 << 20 else { throw ValidationError("--count or --size out of range") }
        let sockets = try (0..<connections).map { _ in try route.open() }
        let perConnection = count
        let samples = UnsafeMutablePointer<UInt64>.allocate(capacity: connections * perConnection)
        nonisolated(unsafe) let s = samples
        let size = self.size
        let start = Syscall.monotonicNanoseconds()
        onThreads(connections) { i in
            let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            let back = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
            memset(out, 0x42, size)
            for k in 0..<perConnection {
                let t0 = Syscall.monotonicNanoseconds()
                guard sockets[i].writeAll(out, size), sockets[i].readExactly(back, size) else { break }
                s[i * perConnection + k] = Syscall.monotonicNanoseconds() - t0
            }
        }
        let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
        for so in sockets { so.close() }
        var all = Array(UnsafeBufferPointer(start: samples, count: connections * perConnection))
        all.sort()
        func pct(_ p: Double) -> Double { Double(all[min(all.count - 1, Int(Double(all.count) * p))]) / 1000 }
        let ops = Double(all.count) / elapsed
        if json {
            print("{\"mode\":\"rr\",\"size\":\(size),\"ops_per_s\":\(ops),\"p50_us\":\(pct(0.5)),\"p90_us\":\(pct(0.9)),\"p99_us\":\(pct(0.99)),\"p999_us\":\(pct(0.999))}")
        } else {
            print("rr size=\(size) ops_per_s=\(Int(ops)) p50_us=\(String(format2: pct(0.5))) p90_us=\(String(format2: pct(0.9))) p99_us=\(String(format2: pct(0.99))) p999_us=\(String(format2: pct(0.999)))")
        }
    }
}

/// Open N connections, verify each with a 1-byte echo, hold, verify again, close.
struct Hold: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Open and hold connections, each verified by a 1-byte echo.")

    @Option(help: "Target HOST:PORT (an echo server, or a proxy in front of one).") var connect: String
    @OptionGroup var proxy: ProxyOptions
    @Option(help: "Connections to open.") var connections: Int = 1000
    @Option(help: "Seconds to hold them open.") var hold: Double = 5

    func run() throws {
        let route = try proxy.route(to: connect)
        guard connections >= 1, connections <= 100_000, hold >= 0, hold <= 3600 else { throw ValidationError("--connections or --hold out of range") }
        var sockets: [ClientSocket] = []
        var byte: UInt8 = 7
        for _ in 0..<connections {
            let s = try route.open()
            guard s.writeAll(&byte, 1), s.readExactly(&byte, 1) else { throw ValidationError("echo failed on a fresh connection") }
            sockets.append(s)
        }
        print("hold open=\(sockets.count)")
        fflush(nil)
        var ts = timespec(tv_sec: Int(hold), tv_nsec: Int((hold - Double(Int(hold))) * 1e9))
        nanosleep(&ts, nil)
        var ok = 0
        for s in sockets where s.writeAll(&byte, 1) && s.readExactly(&byte, 1) { ok += 1 }
        for s in sockets { s.close() }
        print("hold verified=\(ok) of=\(connections)")
        if ok != connections { throw ExitCode(1) }
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
        done.initialize(repeating: 0, count: connections)
        failed.initialize(repeating: 0, count: connections)
        nonisolated(unsafe) let d = done
        nonisolated(unsafe) let f = failed
        let start = Syscall.monotonicNanoseconds()
        let deadline = start + UInt64(duration * 1e9)
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
                } else {
                    if f[i] == 0 { writeStandardError("churn: echo failed: \(Errno.describe(errno))\n") }
                    f[i] += 1
                }
                s.close()
            }
        }
        let elapsed = Double(Syscall.monotonicNanoseconds() - start) / 1e9
        let total = (0..<connections).reduce(0) { $0 + done[$1] }
        let failures = (0..<connections).reduce(0) { $0 + failed[$1] }
        let rate = Double(total) / elapsed
        if json {
            print("{\"mode\":\"churn\",\"connections\":\(total),\"failures\":\(failures),\"seconds\":\(elapsed),\"per_s\":\(rate)}")
        } else {
            print("churn connections=\(total) failures=\(failures) seconds=\(String(format2: elapsed)) per_s=\(Int(rate))")
        }
        if total == 0 { throw ExitCode(1) }
    }
}
