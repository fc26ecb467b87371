import Benchmark
import Glibc
import IgrisEngine

/// A blocking loopback client doing fixed-size round trips through the gateway.
private struct RoundTripClient {
    let fd: Int32
    let size: Int
    let out: UnsafeMutableRawPointer
    let back: UnsafeMutableRawPointer

    init(_ address: SocketAddress, size: Int) throws {
        let socket = try Syscall.socket(family: address.family, type: Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue))
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
    let fd = try Syscall.socket(family: AF_INET, type: Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue))
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
            let t = OperationToken(index: UInt32(truncatingIfNeeded: i), generation: UInt32(truncatingIfNeeded: i), kind: .recvClient)
            sum &+= UInt64(t.index) &+ UInt64(t.generation) &+ UInt64(t.kind.rawValue)
        }
        blackHole(sum)
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
