import Foundation
import Glibc
import IgrisEngine
import Testing

/// Many bulk uploads into a reader that takes everything, through small pipes: the
/// splice-in of a pipe whose slots are taken says EAGAIN while the socket still holds data. epoll once took
/// that for "socket drained" and waited for an edge that never came: once the client had
/// filled the gateway's receive window it sent nothing more, so the bridge stopped reading
/// with megabytes queued, and never closed.
@Suite("Bulk into a sink", .serialized)
struct BulkSinkTests {
    static let connections = 16
    static let chunk = 256 * 1024
    /// Each client writes for this long (bounded in time, not bytes: the stall needs the
    /// gateway's receive windows full, and how much that takes depends on the machine).
    static let writeSeconds = 2.0

    @Test("16 bulk uploads through 16 KiB pipes: every byte arrives and every bridge closes",
          arguments: engineBackends, [SpliceMode.always, .auto])
    func everyUploadCompletes(backend: BackendChoice, splice: SpliceMode) throws {
        let arrived = SharedBox<[ByteTally]>([])
        let sink = try TestUpstream { socket in
            var tally = ByteTally()
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
            defer { buffer.deallocate() }
            while true {
                let n = socket.read(into: buffer)
                if n <= 0 { break }
                tally.add(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
            }
            arrived.update { $0.append(tally) }
            socket.close()
        }
        defer { sink.stop() }
        for round in 0..<2 {
            let gateway = try Gateway(backend: backend, splice: splice, upstream: sink.address) {
                $0.pipeSize = 16384
                $0.spliceThreshold = 1
            }
            defer { gateway.stop() }
            arrived.update { $0.removeAll() }
            let sent = SharedBox<[ByteTally]>([])
            let failures = SharedBox<[String]>([])
            let threads = (0..<Self.connections).map { i in TestThread {
                do {
                    let client = try TestSocket.connect(gateway.address)
                    defer { client.close() }
                    client.setSendTimeout(seconds: 30)
                    client.setReceiveTimeout(seconds: 30)
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.chunk, alignment: 16)
                    defer { buffer.deallocate() }
                    var pattern = PatternStream(seed: UInt64(round * 100 + i))
                    pattern.fill(buffer)
                    var tally = ByteTally()
                    let until = Date().addingTimeInterval(Self.writeSeconds)
                    while Date() < until {
                        guard client.write(UnsafeRawBufferPointer(buffer)) else { throw TestFailure("upload \(i) stalled after \(tally.count) bytes") }
                        tally.add(UnsafeRawBufferPointer(buffer))
                    }
                    sent.update { $0.append(tally) }
                    shutdown(client.fd, Int32(SHUT_WR))
                    // The sink closes at EOF; its close must come back through the bridge.
                    let end = client.readOneByte()
                    guard end == 0 else { throw TestFailure("upload \(i): no close from the gateway (\(end))") }
                } catch {
                    failures.update { $0.append("\(error)") }
                }
            } }
            for t in threads { t.join() }
            #expect(failures.value.isEmpty, "round \(round): \(failures.value)")
            #expect(gateway.eventually { arrived.value.count == Self.connections })
            #expect(Set(arrived.value) == Set(sent.value), "round \(round): every upload arrived intact")
            #expect(gateway.eventually { gateway.active == 0 }, "round \(round): every bridge closed")
        }
    }
}

/// Byte count and a position-weighted checksum: cheap enough for gigabytes on two cores,
/// and it changes when bytes are lost, duplicated or reordered.
struct ByteTally: Hashable {
    var count = 0
    var sum: UInt64 = 0

    mutating func add(_ bytes: UnsafeRawBufferPointer) {
        var s = sum
        var position = UInt64(count)
        for b in bytes {
            s = s &+ UInt64(b) &* (position | 1)
            position &+= 1
        }
        sum = s
        count += bytes.count
    }
}
