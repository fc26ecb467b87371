import Foundation
import Glibc
import IgrisEngine
import Testing

/// The buffer pool follows load: it starts small, grows while a burst needs buffers (never
/// past its share of buffer_memory), and gives the memory back once the burst is over.
@Suite("Buffer pool elasticity", .serialized)
struct PoolElasticityTests {
    static let bufferCount = 512
    /// Few enough that the burst must grow the pool.
    static let initialBuffers = 8
    static let connections = 24
    static let bytesPerConnection = 2 << 20

    @Test("a burst grows the pool; afterwards it shrinks back to where it started", arguments: engineBackends)
    func growsAndShrinksBack(backend: BackendChoice) throws {
        let upstream = try TestUpstream { echo($0) }
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: .never, upstream: upstream.address, workers: 1) {
            $0.buffers = BackendConfiguration(bufferSize: 16 * 1024, bufferCount: Self.bufferCount)
            $0.buffers.initialBufferCount = Self.initialBuffers
        }
        defer { gateway.stop() }
        // The reserve (an eighth of the pool) always circulates beside the main set.
        let initial = Int64(Self.initialBuffers + Self.bufferCount / 8)
        #expect(gateway.eventually { gateway.server.total(.buffersActive) == initial }, "starts with part of its budget")

        // The burst: every connection uploads and reads its echo back at the same time.
        let failures = SharedBox<[String]>([])
        let threads = (0..<Self.connections).map { i in TestThread {
            do {
                let client = try TestSocket.connect(gateway.address)
                defer { client.close() }
                client.setReceiveTimeout(seconds: 30)
                let reader = TestThread {
                    var tally = 0
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
                    defer { buffer.deallocate() }
                    while tally < Self.bytesPerConnection {
                        let n = client.read(into: buffer)
                        if n <= 0 { break }
                        tally += n
                    }
                    if tally != Self.bytesPerConnection { failures.update { $0.append("connection \(i): \(tally) bytes back") } }
                }
                let chunk = [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 64 * 1024)
                for _ in 0..<(Self.bytesPerConnection / chunk.count) {
                    guard client.write(chunk) else { throw TestFailure("connection \(i): write failed") }
                }
                reader.join()
            } catch {
                failures.update { $0.append("\(error)") }
            }
        } }
        for t in threads { t.join() }
        #expect(failures.value.isEmpty, "\(failures.value)")
        let grown = gateway.server.total(.buffersActive)
        #expect(grown > initial, "the burst grew the pool (\(initial) → \(grown))")
        #expect(grown <= Int64(Self.bufferCount), "never past the budget")
        #expect(gateway.eventually { gateway.active == 0 })

        // After it: a trickle of ping-pong (buffers the kernel holds come back through use),
        // until the pool is back where it started.
        let probe = try TestSocket.connect(gateway.address)
        defer { probe.close() }
        probe.setReceiveTimeout(seconds: 10)
        var roundTrips = 0
        let shrunk = gateway.eventually(seconds: 30) {
            roundTrips += 1
            let message = [UInt8](repeating: UInt8(truncatingIfNeeded: roundTrips), count: 64)
            guard probe.write(message), (try? probe.readExactly(64)) == message else { return false }
            return gateway.server.total(.buffersActive) <= initial
        }
        #expect(shrunk, "back to \(initial) buffers, now \(gateway.server.total(.buffersActive)) after \(roundTrips) round trips")
        #expect(gateway.server.total(.buffersParked) >= grown - initial, "the surplus was parked, its pages given back")
    }
}
