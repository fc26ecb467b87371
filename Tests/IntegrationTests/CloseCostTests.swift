import Foundation
import Glibc
import IgrisEngine
import Testing

/// A close cancels only the operations its own connection has pending, named by their
/// user_data, however many other connections are open. (It once cancelled by descriptor,
/// which makes io_uring scan every pending request: per-close cost grew with the number of
/// open connections, and the connection rate fell tenfold at 8,000 idle tunnels.)
@Suite("Close cost", .serialized)
struct CloseCostTests {
    static let idle = 1000
    static let churn = 100

    @Test("aborted connections cancel the same few operations each with 0 and with 1,000 idle bridges, and the idle ones are untouched",
          arguments: engineBackends)
    func cancelsPerCloseDoNotGrow(backend: BackendChoice) throws {
        let upstream = try TestUpstream { socket in
            var byte: UInt8 = 0
            while Syscall.recv(socket.fd, &byte, 1) == 1 {
                guard socket.write([byte]) else { break }
            }
            socket.close()
        }
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, upstream: upstream.address, workers: 1)
        defer { gateway.stop() }

        /// Connect, one echo, then a reset from the client: the bridge aborts with its upstream
        /// recv still pending. Returns the cancellations per close.
        func churnAndCount() throws -> Double {
            let before = gateway.server.total(.cancellations)
            let closedBefore = gateway.server.total(.closedAborted)
            for i in 0..<Self.churn {
                let client = try TestSocket.connect(gateway.address)
                client.setReceiveTimeout(seconds: 10)
                guard client.write([UInt8(truncatingIfNeeded: i)]), (try client.readExactly(1)) == [UInt8(truncatingIfNeeded: i)] else {
                    throw TestFailure("echo \(i) failed")
                }
                Syscall.setLingerZero(client.fd)
                client.close()
            }
            #expect(gateway.eventually { gateway.server.total(.closedAborted) - closedBefore == Int64(Self.churn) })
            // The gauges are published at the end of each loop turn: one more connection,
            // closed cleanly and seen closed, means the turns that closed the others have.
            let gracefulBefore = gateway.server.total(.closedGracefully)
            let last = try TestSocket.connect(gateway.address)
            last.setReceiveTimeout(seconds: 10)
            guard last.write([1]), (try last.readExactly(1)) == [1] else { throw TestFailure("last echo failed") }
            shutdown(last.fd, Int32(SHUT_WR))
            _ = last.readOneByte()
            last.close()
            #expect(gateway.eventually { gateway.server.total(.closedGracefully) > gracefulBefore })
            return Double(gateway.server.total(.cancellations) - before) / Double(Self.churn)
        }

        let alone = try churnAndCount()
        var held: [TestSocket] = []
        defer { for s in held { s.close() } }
        for i in 0..<Self.idle {
            let s = try TestSocket.connect(gateway.address)
            s.setReceiveTimeout(seconds: 10)
            guard s.write([7]), (try s.readExactly(1)) == [7] else { throw TestFailure("idle \(i): echo failed") }
            held.append(s)
        }
        let crowded = try churnAndCount()
        #expect(alone > 0 && alone <= 2, "a close names at most its two pending operations (\(alone))")
        #expect(crowded == alone, "cancellations per close: \(alone) alone, \(crowded) beside \(Self.idle) idle bridges")
        var intact = 0
        for s in held where s.write([9]) && (try? s.readExactly(1)) == [9] { intact += 1 }
        #expect(intact == Self.idle, "every idle bridge still answers")
    }
}
