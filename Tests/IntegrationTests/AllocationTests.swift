import CMallocCounter
import Glibc
import IgrisEngine
import Testing

@Suite("Allocations", .serialized)
struct AllocationTests {
    /// Forwarding 2 × 20,000 operations must not allocate per operation. The client loop
    /// below uses raw buffers and bare syscalls and the echo upstream is another process,
    /// so the process-wide malloc count moves only if the gateway allocates (or the test
    /// runner does something on the side: hence a small allowance, far below one per op).
    /// Under a sanitizer (`make test-asan`/`test-tsan` define IGRIS_SANITIZED) the sanitizer
    /// owns malloc and allocates for its own bookkeeping: the count means nothing there.
    #if IGRIS_SANITIZED
    static let countsMallocs = false
    #else
    static let countsMallocs = true
    #endif

    @Test("steady-state forwarding allocates nothing per operation", .enabled(if: countsMallocs, "a sanitizer owns malloc in this build"),
          arguments: engineBackends)
    func noAllocationPerOperation(backend: BackendChoice) throws {
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0"])
        defer { echo.terminate() }
        let line = echo.readLine()
        let upstream = try SocketAddress.resolve(String(try #require(line.split(separator: " ").last)))
        let gateway = try Gateway(backend: backend, upstream: upstream, workers: 1)
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        defer { client.close() }
        client.setReceiveTimeout(seconds: 10)
        let size = 4096
        let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
        let back = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
        defer { out.deallocate(); back.deallocate() }
        memset(out, 0x61, size)

        func roundTrips(_ n: Int) -> Bool {
            for _ in 0..<n {
                var off = 0
                while off < size {
                    let w = Syscall.send(client.fd, out + off, size - off)
                    if w <= 0 { return false }
                    off += w
                }
                off = 0
                while off < size {
                    let r = Syscall.recv(client.fd, back + off, size - off)
                    if r <= 0 { return false }
                    off += r
                }
            }
            return true
        }

        #expect(roundTrips(2000))  // warm-up: tables and queues reach their working size
        let before = igris_allocation_count()
        let ok = roundTrips(10_000)
        let allocations = igris_allocation_count() &- before
        #expect(ok)
        print("allocations during 10,000 round trips on \(backend.rawValue): \(allocations)")
        #expect(memcmp(out, back, size) == 0)
        // 10,000 round trips = 40,000+ recv/send completions in the gateway.
        #expect(allocations < 50, "\(allocations) allocations during 10,000 round trips")
    }
}
