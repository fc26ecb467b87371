// igris-allocations: counts heap allocations while a gateway forwards steady-state traffic,
// in whatever build it was compiled (`make test` runs the release build, as swift-nio's
// allocation-counter tests do, so hot-path code is judged as it ships).
//
//   igris-allocations --backend io_uring|epoll --upstream HOST:PORT [--round-trips N]
//
// Prints "allocations N round_trips M" and exits 0, or one line on stderr and exits 1.
import CMallocCounter
import Glibc
import IgrisEngine

func fail(_ message: String) -> Never {
    let line = "igris-allocations: \(message)\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
    exit(1)
}

@main
enum AllocationProbe {
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        func option(_ name: String) -> String? {
            guard let i = arguments.firstIndex(of: name), i + 1 < arguments.count else { return nil }
            return arguments[i + 1]
        }
        guard let backendText = option("--backend"), let backend = BackendChoice(rawValue: backendText) else { fail("--backend io_uring|epoll") }
        guard let upstreamText = option("--upstream"), let upstream = try? SocketAddress.resolve(upstreamText) else { fail("--upstream HOST:PORT") }
        let roundTrips = Int(option("--round-trips") ?? "10000") ?? 10000

        var configuration = ServerConfiguration(forwards: [ForwardRule(listen: try! SocketAddress.resolve("127.0.0.1:0"), upstream: upstream)],
                                                workers: 1, backend: backend)
        configuration.splice = .never
        let server: Server
        do {
            server = try Server(configuration: configuration)
            try server.start()
        } catch {
            fail("\(error)")
        }
        let client: Int32
        do {
            client = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
            let rc = server.listenAddresses[0].withSockAddr { connect(client, $0, $1) }
            if rc != 0 { fail("connect: \(Errno.describe(errno))") }
        } catch {
            fail("\(error)")
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))

        let size = 4096
        let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
        let back = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
        memset(out, 0x61, size)

        func run(_ n: Int) -> Bool {
            for _ in 0..<n {
                var off = 0
                while off < size {
                    let w = Syscall.send(client, out + off, size - off)
                    if w <= 0 { return false }
                    off += w
                }
                off = 0
                while off < size {
                    let r = Syscall.recv(client, back + off, size - off)
                    if r <= 0 { return false }
                    off += r
                }
            }
            return true
        }

        guard run(2000) else { fail("warm-up round trips failed") }  // tables and queues reach their working size
        let before = igris_allocation_count()
        let ok = run(roundTrips)
        let allocations = igris_allocation_count() &- before
        guard ok, memcmp(out, back, size) == 0 else { fail("round trips failed or bytes differ") }
        print("allocations \(allocations) round_trips \(roundTrips)")
        Syscall.close(client)
        server.beginDrain()
        server.wait()
    }
}
