import Foundation
import Glibc
import IgrisEngine
import Testing

/// Many bulk uploads into a reader that takes everything, through small pipes: the
/// splice-in of a full pipe says EAGAIN while the socket still holds data. epoll once took
/// that for "socket drained" and waited for an edge that never came: bridges stopped
/// reading with megabytes queued, and never closed.
@Suite("Bulk into a sink", .serialized)
struct BulkSinkTests {
    static let connections = 16
    static let bytesPerConnection = 4 << 20

    @Test("16 bulk uploads through 16 KiB pipes: every byte arrives and every bridge closes",
          arguments: engineBackends, [SpliceMode.always, .auto])
    func everyUploadCompletes(backend: BackendChoice, splice: SpliceMode) throws {
        let arrived = SharedBox<[[UInt8]]>([])
        let sink = try TestUpstream { socket in
            let (_, digest, _) = receiveDigest(socket)
            arrived.update { $0.append(digest) }
            socket.close()
        }
        defer { sink.stop() }
        // Three rounds: the stall hit 7 of 16 bridges in one round with splice always, and
        // about one round in ten with auto.
        for round in 0..<3 {
            let gateway = try Gateway(backend: backend, splice: splice, upstream: sink.address) {
                $0.pipeSize = 16384
                $0.spliceThreshold = 1
            }
            defer { gateway.stop() }
            arrived.update { $0.removeAll() }
            let sent = SharedBox<[[UInt8]]>([])
            let failures = SharedBox<[String]>([])
            let threads = (0..<Self.connections).map { i in TestThread {
                do {
                    let client = try TestSocket.connect(gateway.address)
                    defer { client.close() }
                    client.setSendTimeout(seconds: 30)
                    client.setReceiveTimeout(seconds: 30)
                    let (count, digest) = sendPattern(client, seed: UInt64(round * 100 + i), count: Self.bytesPerConnection)
                    guard count == Self.bytesPerConnection else { throw TestFailure("upload \(i) stalled after \(count) bytes") }
                    sent.update { $0.append(digest) }
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
