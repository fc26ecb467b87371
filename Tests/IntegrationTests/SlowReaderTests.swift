import Foundation
import Glibc
import IgrisEngine
import Testing

/// Clients that stop reading (a phone in a tunnel, a stalled app) while their upstream keeps
/// sending. Each once kept up to two pool buffers pinned behind a send that never finished,
/// so a few dozen of them emptied a worker's pool and every other connection on it stopped:
/// no ping-pong, no new connection. Now a direction whose destination is full reads only
/// what the destination takes, and waits for room holding no buffer; the slow readers'
/// bytes wait in the kernel's socket buffers and all arrive once they read again.
@Suite("Slow readers", .serialized)
struct SlowReaderTests {
    static let bufferCount = 16
    static let bufferSize = 16 * 1024
    /// Enough slow readers to pin every buffer of the pool, one or two each.
    static let slowReaders = 24
    static let bytesPerSlowReader = 4 << 20
    static let probes = 4
    static let probeRoundTrips = 50

    @Test("slow readers pin no pool: ping-pong and new connections flow, and every slow reader gets every byte",
          arguments: engineBackends, [SpliceMode.never, .auto])
    func othersKeepFlowing(backend: BackendChoice, splice: SpliceMode) throws {
        let expected = Self.expectedTally()
        let written = SharedCounter()
        // 'S': send the pattern and close; 'P': echo.
        let upstream = try TestUpstream { socket in
            guard let mode = try? socket.readExactly(1) else { socket.close(); return }
            if mode == [UInt8(ascii: "S")] {
                let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.bytesPerSlowReader, alignment: 16)
                defer { chunk.deallocate() }
                var pattern = PatternStream(seed: 7)
                pattern.fill(chunk)
                _ = socket.write(UnsafeRawBufferPointer(chunk))
                written.add(1)
                shutdown(socket.fd, Int32(SHUT_WR))
                _ = socket.readOneByte()
                socket.close()
            } else {
                echo(socket)
            }
        }
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: splice, upstream: upstream.address, workers: 1) {
            $0.buffers = BackendConfiguration(bufferSize: Self.bufferSize, bufferCount: Self.bufferCount)
            $0.pipeSize = 64 * 1024
        }
        defer { gateway.stop() }

        // The slow readers: ask for their bytes, then read nothing until released.
        let release = DispatchSemaphore(value: 0)
        let received = SharedBox<[ByteTally]>([])
        let failures = SharedBox<[String]>([])
        let slow = (0..<Self.slowReaders).map { i in TestThread {
            do {
                // A small fixed window (no autotuning), as a phone's: the gateway's sends to it
                // fill up after a few kilobytes.
                let client = try TestSocket.connect(gateway.address, receiveBuffer: 4096)
                defer { client.close() }
                client.setReceiveTimeout(seconds: 30)
                guard client.write([UInt8(ascii: "S")]) else { throw TestFailure("slow reader \(i): write failed") }
                release.wait()
                var tally = ByteTally()
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
                defer { buffer.deallocate() }
                while true {
                    let n = client.read(into: buffer)
                    if n == 0 { break }
                    guard n > 0 else { throw TestFailure("slow reader \(i): read failed (\(n)) after \(tally.count) bytes") }
                    tally.add(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
                }
                received.update { $0.append(tally) }
            } catch {
                failures.update { $0.append("\(error)") }
            }
        } }
        defer { for _ in slow { release.signal() } }

        // Stalled: the slow readers hold half the pool (where reads become bounded), or their
        // directions moved to splice and hold pipes instead, or the kernel's socket buffers
        // took everything.
        let stalled = gateway.eventually(seconds: 20) {
            gateway.server.total(.buffersInUse) >= Int64(Self.bufferCount / 2)
                || gateway.server.total(.pipesInUse) >= Int64(Self.slowReaders / 2)
                || written.value == Self.slowReaders
        }
        #expect(stalled, "the slow readers never filled their windows")

        // Meanwhile: ping-pong on new connections, each round trip bounded by its timeout.
        let probes = (0..<Self.probes).map { i in TestThread {
            do {
                let client = try TestSocket.connect(gateway.address)
                defer { client.close() }
                client.setReceiveTimeout(seconds: 20)
                guard client.write([UInt8(ascii: "P")]) else { throw TestFailure("probe \(i): write failed") }
                for round in 0..<Self.probeRoundTrips {
                    let message = (0..<64).map { UInt8(truncatingIfNeeded: $0 &+ round &+ i) }
                    guard client.write(message) else { throw TestFailure("probe \(i): write failed at round \(round)") }
                    let echo = try client.readExactly(64)
                    guard echo == message else { throw TestFailure("probe \(i): wrong echo at round \(round)") }
                }
            } catch {
                failures.update { $0.append("\(error)") }
            }
        } }
        for t in probes { t.join() }
        let counters: [WorkerStatistics.Counter] = [.buffersInUse, .buffersActive, .roomWaits, .bufferExhaustions, .pipesInUse, .activeConnections, .acceptedTotal]
        #expect(failures.value.isEmpty, "while slow readers stall: \(failures.value) \(counters.map { "\($0)=\(gateway.server.total($0))" })")
        #expect(gateway.server.total(.buffersInUse) <= Int64(Self.bufferCount))

        for _ in slow { release.signal() }
        for t in slow { t.join() }
        #expect(failures.value.isEmpty, "\(failures.value)")
        #expect(received.value.count == Self.slowReaders)
        #expect(received.value.allSatisfy { $0 == expected }, "every slow reader got every byte, in order")
        #expect(gateway.eventually { gateway.active == 0 })
        #expect(gateway.eventually { gateway.server.total(.buffersInUse) == 0 }, "every buffer came back")
    }

    static func expectedTally() -> ByteTally {
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: bytesPerSlowReader, alignment: 16)
        defer { chunk.deallocate() }
        var pattern = PatternStream(seed: 7)
        pattern.fill(chunk)
        var tally = ByteTally()
        tally.add(UnsafeRawBufferPointer(chunk))
        return tally
    }
}
