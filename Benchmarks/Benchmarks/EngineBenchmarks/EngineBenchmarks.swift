import Benchmark
import Glibc
@_spi(Benchmarks) import IgrisEngine
import IgrisProtocols

/// A blocking loopback client doing fixed-size round trips through the gateway.
private struct RoundTripClient {
    let fd: Int32
    let size: Int
    let out: UnsafeMutableRawPointer
    let back: UnsafeMutableRawPointer

    init(_ address: SocketAddress, size: Int) throws {
        let socket = try Syscall.streamSocket(family: address.family, nonBlocking: false)
        fd = socket
        let rc = address.withSockAddr { Glibc.connect(socket, $0, $1) }
        if rc != 0 { throw SyscallError("connect", errno: errno) }
        try Syscall.setIntOption(fd, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
        self.size = size
        out = .allocate(byteCount: size, alignment: 16)
        back = .allocate(byteCount: size, alignment: 16)
        memset(out, 0x61, size)
    }

    func roundTrip() {
        var off = 0
        while off < size { let n = Syscall.send(fd, out + off, size - off); precondition(n > 0); off += n }
        off = 0
        while off < size { let n = Syscall.recv(fd, back + off, size - off); precondition(n > 0); off += n }
    }
}

/// An upstream echo on its own thread (raw syscalls, no allocation per byte).
private func startEcho() throws -> SocketAddress {
    let fd = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
    try Syscall.bind(fd, try SocketAddress.resolve("127.0.0.1:0"))
    try Syscall.listen(fd, backlog: 64)
    let address = try Syscall.localAddress(fd)
    final class Box { let fd: Int32; init(_ fd: Int32) { self.fd = fd } }
    var thread = pthread_t()
    pthread_create(&thread, nil, { raw in
        let listener = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().fd
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 16)
        while true {
            let c = accept(listener, nil, nil)
            if c < 0 { continue }
            var one: Int32 = 1
            setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
            while true {
                let n = Syscall.recv(c, buffer, 65536)
                if n <= 0 { break }
                var off = 0
                while off < n { let w = Syscall.send(c, buffer + off, n - off); if w <= 0 { break }; off += w }
            }
            close(c)
        }
    }, Unmanaged.passRetained(Box(fd)).toOpaque())
    return address
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        maxDuration: .seconds(3),
        maxIterations: 100_000
    )

    Benchmark("BufferPool take+return", configuration: .init(scalingFactor: .kilo)) { benchmark in
        let pool = try BufferPool(size: 64 * 1024, count: 256)
        for _ in benchmark.scaledIterations {
            let id = pool.take()!
            pool.markLent()
            pool.putBack(id)
            pool.markReturned()
        }
    }

    Benchmark("OperationToken encode+decode", configuration: .init(scalingFactor: .mega)) { benchmark in
        var sum: UInt64 = 0
        for i in benchmark.scaledIterations {
            let t = OperationToken(index: UInt32(truncatingIfNeeded: i), generation: UInt32(truncatingIfNeeded: i), kind: .recv, direction: 1)
            sum &+= UInt64(t.index) &+ UInt64(t.generation) &+ UInt64(t.kind.rawValue)
        }
        blackHole(sum)
    }

    // Schedule + cancel of a connection's timer (what every bridge does per idle-timeout
    // reset), and a schedule that expires: no allocation either way.
    Benchmark("TimerWheel schedule+cancel", configuration: .init(scalingFactor: .kilo,
                                                                  thresholds: [.mallocCountTotal: .init(absolute: [.p90: 0])])) { benchmark in
        let table = ConnectionTable(capacity: 1024)
        var wheel = TimerWheel(now: 1_000_000_000)
        for _ in 0..<1024 { _ = table.allocate() }
        for i in benchmark.scaledIterations {
            let slot = Int32(i & 1023)
            wheel.schedule(slot, deadline: 1_000_000_000 + UInt64(i & 0xFFFF) * 1_000_000, table: table)
            wheel.cancel(slot, table: table)
        }
        blackHole(wheel.scheduled)
    }

    Benchmark("TimerWheel schedule+expire (1,024 timers)") { benchmark in
        let table = ConnectionTable(capacity: 1024)
        for _ in 0..<1024 { _ = table.allocate() }
        var fired: [Int32] = []
        fired.reserveCapacity(1024)
        var now: UInt64 = 1_000_000_000
        var wheel = TimerWheel(now: now)
        for _ in benchmark.scaledIterations {
            for s in 0..<Int32(1024) { wheel.schedule(s, deadline: now + UInt64(s) * 100_000, table: table) }
            now += 200_000_000
            wheel.expire(now: now, table: table, into: &fired)
            precondition(fired.count == 1024)
            fired.removeAll(keepingCapacity: true)
        }
    }

    // Codecs: a whole SOCKS5 handshake (greeting, RFC 1929 credentials, CONNECT to a name)
    // and an HTTP CONNECT head with Basic credentials, parsed as the worker parses them.
    let socks: [UInt8] = [5, 2, 0, 2] + [1, 5] + Array("alice".utf8) + [6] + Array("secret".utf8)
        + [5, 1, 0, 3, 11] + Array("example.org".utf8) + [1, 187]
    Benchmark("SOCKS5 handshake parse", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            var h = Socks5ServerHandshake()
            var offset = 0
            socks.withUnsafeBytes { all in
                while offset < all.count {
                    let (n, event) = h.feed(UnsafeRawBufferPointer(rebasing: all[offset...]))
                    offset += n
                    switch event {
                    case .greeting: h.select(.usernamePassword)
                    case .credentials: h.authenticated()
                    default: break
                    }
                }
            }
            blackHole(h.phase)
        }
    }

    let head = Array("CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\nUser-Agent: curl/7.88.1\r\nProxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\nProxy-Connection: Keep-Alive\r\n\r\n".utf8)
    Benchmark("HTTP CONNECT head parse", configuration: .init(scalingFactor: .kilo)) { benchmark in
        for _ in benchmark.scaledIterations {
            var parser = HTTPHeadParser()
            let (_, event) = head.withUnsafeBytes { parser.feed($0) }
            guard case .head(let h) = event, case .success(let request) = HTTPConnect.request(from: h) else { fatalError("parse failed") }
            blackHole(request.port)
        }
    }

    // One 64-byte round trip through a gateway forwarding to an echo: four forwarded
    // operations per iteration. Steady state must not allocate (threshold: 0 mallocs).
    for backend in [BackendChoice.ioUring, .epoll] {
        Benchmark("bridge round trip 64 B (\(backend.rawValue))",
                  configuration: .init(metrics: [.wallClock, .throughput, .mallocCountTotal],
                                       thresholds: [.mallocCountTotal: .init(absolute: [.p90: 0])])) { (benchmark: Benchmark, client: RoundTripClient) in
            for _ in benchmark.scaledIterations { client.roundTrip() }
        } setup: {
            let echo = try startEcho()
            var configuration = ServerConfiguration(
                forwards: [ForwardRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: echo)], workers: 1, backend: backend)
            configuration.splice = .never
            let server = try Server(configuration: configuration)
            try server.start()
            let client = try RoundTripClient(server.listenAddresses[0], size: 64)
            for _ in 0..<1000 { client.roundTrip() }  // warm-up: tables reach their working size
            return client
        }
    }
}
