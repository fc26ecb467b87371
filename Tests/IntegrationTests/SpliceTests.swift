import Dispatch
import Foundation
import Glibc
import IgrisEngine
import Testing

@Suite("Splice", .serialized)
struct SpliceTests {
    @Test("pipe budget 0: splice always still forwards everything, on copy, and says so", arguments: engineBackends)
    func noPipesFallsBackToCopy(backend: BackendChoice) throws {
        let size = 1 << 20
        let received = SharedBox<[Int: (Int, [UInt8])]>([:])
        let upstream = try fullDuplexUpstream(size: size, results: received)
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: .always, upstream: upstream.address) { $0.maxPipes = 0 }
        defer { gateway.stop() }
        try fullDuplexTransfer(gateway, connections: 4, size: size, upstreamResults: received)
        #expect(gateway.server.total(.pipeFallbacks) >= 8, "each of the 8 directions fell back")
        #expect(gateway.server.total(.spliceBytes) == 0)
        #expect(gateway.server.total(.pipesPeak) == 0)
    }

    @Test("auto: a bulk direction moves to splice, a ping-pong stays on copy", arguments: engineBackends)
    func autoSwitchesBulkOnly(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: .auto, upstream: upstream.address) { $0.spliceThreshold = 2 }
        defer { gateway.stop() }

        let chat = try TestSocket.connect(gateway.address)
        chat.setReceiveTimeout(seconds: 10)
        for i in 0..<200 {
            let message = [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 100)
            chat.write(message)
            #expect(try chat.readExactly(100) == message)
        }
        chat.close()
        #expect(gateway.eventually { gateway.active == 0 })
        #expect(gateway.server.total(.spliceSwitches) == 0, "interactive traffic moved to splice")

        let sinkGot = SharedBox<(Int, [UInt8])?>(nil)
        let sink = try TestUpstream { socket in
            let r = receiveDigest(socket)
            sinkGot.value = (r.received, r.digest)
            socket.close()
        }
        defer { sink.stop() }
        let bulkGateway = try Gateway(backend: backend, splice: .auto, upstream: sink.address) { $0.spliceThreshold = 2 }
        defer { bulkGateway.stop() }
        let bulk = try TestSocket.connect(bulkGateway.address)
        let size = 32 << 20
        let sent = sendPattern(bulk, seed: 21, count: size)
        bulk.shutdownWrite()
        #expect(bulkGateway.eventually(seconds: 30) { sinkGot.value != nil })
        bulk.close()
        #expect(sinkGot.value?.0 == size)
        #expect(sinkGot.value?.1 == sent.digest)
        #expect(bulkGateway.server.total(.spliceSwitches) >= 1)
        #expect(bulkGateway.server.total(.spliceBytes) > 0)
        #expect(bulkGateway.eventually { bulkGateway.active == 0 && bulkGateway.server.total(.pipesInUse) == 0 })
    }

    @Test("splice: an aborted bridge with bytes in its pipe counts them as dropped and reuses no dirty pipe", arguments: engineBackends)
    func abortWithBytesInPipe(backend: BackendChoice) throws {
        // The upstream reads nothing and then resets: whatever sits in the pipe is lost.
        let release = DispatchSemaphore(value: 0)
        let upstream = try TestUpstream { socket in
            release.wait()
            socket.reset()
        }
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: .always, upstream: upstream.address, workers: 1)
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        client.setSendTimeout(seconds: 2)
        let writer = TestThread { _ = sendPattern(client, seed: 31, count: 16 << 20) }
        // Stalled with a pipe borrowed: the pipe holds bytes (an empty pipe with nothing in
        // flight goes back at once), and they can only leave through the reset socket.
        var lastMoved: Int64 = -1
        #expect(gateway.eventually {
            let moved = gateway.server.total(.bytesClientToUpstream)
            defer { lastMoved = moved; usleep(100_000) }
            return moved == lastMoved && gateway.server.total(.pipesInUse) == 1
        })
        release.signal()
        writer.join()
        client.close()
        #expect(gateway.eventually { gateway.active == 0 })
        #expect(gateway.server.total(.pipesInUse) == 0)
        #expect(gateway.server.total(.spliceBytesDropped) > 0)
    }
}

@Suite("Zero-copy send", .serialized)
struct ZeroCopySendTests {
    @Test("io_uring SEND_ZC on the copy path: full-duplex bytes intact, every buffer back after its notification")
    func sendZeroCopyIntact() throws {
        let size = 8 << 20
        let received = SharedBox<[Int: (Int, [UInt8])]>([:])
        let upstream = try fullDuplexUpstream(size: size, results: received)
        defer { upstream.stop() }
        let gateway = try Gateway(backend: .ioUring, splice: .never, upstream: upstream.address) {
            $0.buffers = BackendConfiguration(zeroCopySendThreshold: 16 * 1024)
        }
        defer { gateway.stop() }
        try fullDuplexTransfer(gateway, connections: 8, size: size, upstreamResults: received)
        #expect(gateway.server.total(.buffersInUse) == 0)
    }
}
