import Dispatch
import Foundation
import Glibc
import IgrisEngine
import Testing

/// The forward bridge end to end over loopback, same body on each backend.
@Suite("Bridge", .serialized)
struct BridgeTests {
    @Test("32 connections × 4 MiB each way at once arrive intact (SHA-256)", arguments: engineBackends, spliceModes)
    func integrityFullDuplex(backend: BackendChoice, splice: SpliceMode) throws {
        let size = 4 << 20
        let connections = 32
        let received = SharedBox<[Int: (Int, [UInt8])]>([:])
        let upstream = try fullDuplexUpstream(size: size, results: received)
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: splice, upstream: upstream.address)
        defer { gateway.stop() }
        try fullDuplexTransfer(gateway, connections: connections, size: size, upstreamResults: received)
        #expect(gateway.server.total(.bytesClientToUpstream) == Int64(connections * (size + 8)))
        #expect(gateway.server.total(.bytesUpstreamToClient) == Int64(connections * size))
        #expect(gateway.server.total(.buffersInUse) == 0)
        #expect(gateway.server.total(.pipesInUse) == 0)
        if splice == .always {
            #expect(gateway.server.total(.spliceBytes) == Int64(connections * (2 * size + 8)))
        }
    }

    @Test("client half-close: upstream sees EOF, its reply still reaches the client", arguments: engineBackends, spliceModes)
    func halfCloseFromClient(backend: BackendChoice, splice: SpliceMode) throws {
        try clientHalfClose { try Gateway(backend: backend, splice: splice, upstream: $0) }
    }

    @Test("upstream half-close: client sees EOF, its late bytes still reach the upstream", arguments: engineBackends, spliceModes)
    func halfCloseFromUpstream(backend: BackendChoice, splice: SpliceMode) throws {
        let n = 300_000, m = 700_000
        let upstreamGot = SharedBox<(Int, [UInt8], Int32?)?>(nil)
        let upstream = try TestUpstream { socket in
            _ = sendPattern(socket, seed: 3, count: m)
            socket.shutdownWrite()
            let r = receiveDigest(socket)
            upstreamGot.value = (r.received, r.digest, r.error)
            socket.close()
        }
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: splice, upstream: upstream.address)
        defer { gateway.stop() }

        let client = try TestSocket.connect(gateway.address)
        client.setReceiveTimeout(seconds: 20)
        let first = receiveDigest(client)       // EOF while our write side is still open
        #expect(first.error == nil)
        #expect(first.received == m)
        #expect(first.digest == patternDigest(seed: 3, count: m))
        let sent = sendPattern(client, seed: 4, count: n)
        #expect(sent.sent == n)
        client.shutdownWrite()
        // The upstream closes after reading our EOF; we see nothing more.
        var tail = [UInt8](repeating: 0, count: 16)
        #expect(tail.withUnsafeMutableBytes { client.read(into: $0) } == 0)
        client.close()
        #expect(gateway.eventually { upstreamGot.value != nil && gateway.active == 0 })
        #expect(upstreamGot.value?.0 == n)
        #expect(upstreamGot.value?.1 == sent.digest)
        #expect(upstreamGot.value?.2 == nil)
    }

    @Test("an upstream reset mid-stream ends the client's connection and frees the slot", arguments: engineBackends, spliceModes)
    func upstreamResetAbortsClient(backend: BackendChoice, splice: SpliceMode) throws {
        let upstream = try TestUpstream { socket in
            _ = try? socket.readExactly(256 * 1024)
            socket.write([UInt8](repeating: 9, count: 1000))
            socket.reset()
        }
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: splice, upstream: upstream.address)
        defer { gateway.stop() }

        let client = try TestSocket.connect(gateway.address)
        client.setReceiveTimeout(seconds: 5)
        client.setSendTimeout(seconds: 5)
        let writer = TestThread { _ = sendPattern(client, seed: 5, count: 64 << 20) }
        var buffer = [UInt8](repeating: 0, count: 65536)
        var total = 0
        var end = 0
        while true {
            end = buffer.withUnsafeMutableBytes { client.read(into: $0) }
            if end <= 0 { break }
            total += end
        }
        // Ended by RST (or EOF when the RST raced our read), never by the 5 s receive timeout.
        #expect(end == 0 || end == -Int(ECONNRESET), "client read ended with \(end < 0 ? Errno.describe(Int32(-end)) : "\(end)")")
        #expect(total <= 1000)
        writer.join()
        client.close()
        #expect(gateway.eventually { gateway.active == 0 }, "slot leaked: active=\(gateway.active)")
        #expect(gateway.server.total(.closedAborted) == 1)
        #expect(gateway.server.total(.buffersInUse) == 0)
    }

    @Test("a reader stalled for 2 s holds the bridge to its buffer bound; all 64 MiB arrive", arguments: engineBackends, spliceModes)
    func slowReaderIsBackpressured(backend: BackendChoice, splice: SpliceMode) throws {
        let size = 64 << 20
        let release = DispatchSemaphore(value: 0)
        let got = SharedBox<(Int, [UInt8], Int32?)?>(nil)
        let upstream = try TestUpstream { socket in
            release.wait()
            let r = receiveDigest(socket)
            got.value = (r.received, r.digest, r.error)
            socket.close()
        }
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, splice: splice, upstream: upstream.address)
        defer { gateway.stop() }

        let client = try TestSocket.connect(gateway.address)
        let sent = SharedBox<[UInt8]>([])
        let writer = TestThread {
            sent.value = sendPattern(client, seed: 6, count: size).digest
            client.shutdownWrite()
        }
        // The scenario itself: the upstream reads nothing for 2 s while the client pushes.
        usleep(2_000_000)
        let peakWhileStalled = gateway.server.total(.buffersPeak)
        let movedWhileStalled = gateway.server.total(.bytesClientToUpstream)
        release.signal()
        writer.join()
        #expect(gateway.eventually(seconds: 30) { got.value != nil })
        client.close()
        // One direction holds at most two buffers (one being sent, one received ahead):
        // memory is set by the pool, not by the 64 MiB pushed at it.
        #expect(peakWhileStalled <= 2, "buffers in use peaked at \(peakWhileStalled)")
        // On the splice path the bound is one pipe per direction.
        #expect(gateway.server.total(.pipesPeak) <= 2)
        #expect(movedWhileStalled < Int64(size), "the stall did not stall anything")
        #expect(got.value?.0 == size)
        #expect(got.value?.1 == sent.value)
        #expect(got.value?.2 == nil)
        #expect(gateway.eventually { gateway.active == 0 })
    }

    @Test("refused upstream: client closed within 1 s and counted", arguments: engineBackends)
    func upstreamRefused(backend: BackendChoice) throws {
        let port = try unusedPort()
        let gateway = try Gateway(backend: backend, upstream: try SocketAddress.resolve("127.0.0.1:\(port)"))
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        client.setReceiveTimeout(seconds: 1)
        let n = client.readOneByte()
        #expect(n == 0 || n == -Int(ECONNRESET), "expected close within 1 s, read gave \(n < 0 ? Errno.describe(Int32(-n)) : "\(n) bytes")")
        client.close()
        #expect(gateway.server.total(.connectFailures) == 1)
        #expect(gateway.eventually { gateway.active == 0 })
    }

    @Test("upstream that never answers the SYN: connect timeout closes the client", arguments: engineBackends)
    func connectTimeout(backend: BackendChoice) throws {
        // A listener with backlog 0 that never accepts: once its queue is full, further SYNs
        // are dropped and connects hang, exactly like an unreachable upstream.
        let (fd, black) = try listeningSocket("127.0.0.1:0", backlog: 0)
        defer { Glibc.close(fd) }
        var fillers: [Int32] = []
        defer { for f in fillers { Glibc.close(f) } }
        for _ in 0..<3 {
            let f = try Syscall.streamSocket(family: AF_INET)
            _ = black.withSockAddr { Glibc.connect(f, $0, $1) }
            fillers.append(f)
        }
        let gateway = try Gateway(backend: backend, upstream: black) { $0.connectTimeoutNanoseconds = 300_000_000 }
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        expectClosedByGateway(client, gateway, counting: .connectTimeouts)
    }

    @Test("idle timeout closes a bridge with no traffic", arguments: engineBackends)
    func idleTimeout(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, upstream: upstream.address) { $0.idleTimeoutNanoseconds = 300_000_000 }
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        client.setReceiveTimeout(seconds: 5)
        client.write([1, 2, 3])
        #expect(try client.readExactly(3) == [1, 2, 3])
        expectClosedByGateway(client, gateway, counting: .idleTimeouts)
    }

    @Test("--max-connections: connections past the cap wait in the backlog, none is accepted only to be closed",
          arguments: engineBackends)
    func maxConnections(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        // One worker: with several, two could each take the last place at once (the global
        // budget is shared) and one of them would have to close its connection.
        let gateway = try Gateway(backend: backend, upstream: upstream.address, workers: 1) { $0.maxConnections = 4 }
        defer { gateway.stop() }
        let first = try (0..<4).map { i in
            let s = try TestSocket.connect(gateway.address)
            s.setReceiveTimeout(seconds: 10)
            s.write([UInt8(i)])
            #expect(try s.readExactly(1) == [UInt8(i)])
            return s
        }
        // Eight more: the kernel completes their handshakes, the gateway leaves them queued.
        let waiting = try (0..<8).map { i in
            let s = try TestSocket.connect(gateway.address)
            s.setReceiveTimeout(seconds: 10)
            s.write([UInt8(100 + i)])
            return s
        }
        #expect(gateway.server.total(.acceptedTotal) == 4)
        first[0].write([9])
        #expect(try first[0].readExactly(1) == [9], "the bridges under the cap keep working")
        // Each place that frees lets one waiting connection in, in order; all are served.
        for s in first { s.close() }
        for (i, s) in waiting.enumerated() {
            #expect(try s.readExactly(1) == [UInt8(100 + i)], "waiting connection \(i) served")
            if i < 4 { s.close() }
        }
        #expect(gateway.server.total(.rejectedAtCapacity) == 0, "none was accepted only to be closed")
        #expect(gateway.server.total(.acceptedTotal) == 12)
        for s in waiting.dropFirst(4) { s.close() }
        #expect(gateway.eventually { gateway.active == 0 })
    }

    @Test("IPv6: [::1] to [::1]", arguments: engineBackends)
    func ipv6(backend: BackendChoice) throws {
        let (fd, up) = try listeningSocket("[::1]:0", backlog: 16)
        defer { Glibc.close(fd) }
        var configuration = ServerConfiguration(
            forwards: [ForwardRule(listen: try SocketAddress.resolve("[::1]:0"), upstream: up)], workers: 1, backend: backend)
        configuration.drainTimeoutNanoseconds = 1_000_000_000
        let server = try Server(configuration: configuration)
        try server.start()
        defer { server.beginDrain(); server.wait() }
        let client = try TestSocket.connect(server.listenAddresses[0])
        client.setReceiveTimeout(seconds: 5)
        let accepted = TestSocket(fd: accept(fd, nil, nil))
        accepted.setReceiveTimeout(seconds: 5)
        client.write([1, 2, 3, 4])
        #expect(try accepted.readExactly(4) == [1, 2, 3, 4])
        accepted.write([5, 6])
        #expect(try client.readExactly(2) == [5, 6])
        client.close()
        accepted.close()
        #expect(server.listenAddresses[0].description.hasPrefix("[::1]:"))
    }
}

/// The gateway closes `client` (EOF, within 5 s), counts it once in `counter`, frees the slot.
func expectClosedByGateway(_ client: TestSocket, _ gateway: Gateway, counting counter: WorkerStatistics.Counter,
                           sourceLocation: SourceLocation = #_sourceLocation) {
    client.setReceiveTimeout(seconds: 5)
    let n = client.readOneByte()
    client.close()
    #expect(n == 0, "expected EOF, read gave \(n)", sourceLocation: sourceLocation)
    #expect(gateway.server.total(counter) == 1, sourceLocation: sourceLocation)
    #expect(gateway.eventually { gateway.active == 0 }, sourceLocation: sourceLocation)
}

/// A client half-close through the gateway `make` builds for the upstream: the upstream sees
/// EOF, its reply still reaches the client, the bridge closes gracefully; `check` looks at the
/// gateway before it stops.
func clientHalfClose(_ make: (SocketAddress) throws -> Gateway, check: (Gateway) -> Void = { _ in }) throws {
    let n = 300_000, m = 700_000
    let upstreamGot = SharedBox<(Int, [UInt8])?>(nil)
    let upstream = try TestUpstream { socket in
        let r = receiveDigest(socket)          // to EOF: the client's shutdown arrived
        upstreamGot.value = (r.received, r.digest)
        _ = sendPattern(socket, seed: 2, count: m)
        socket.close()
    }
    defer { upstream.stop() }
    let gateway = try make(upstream.address)
    defer { gateway.stop() }
    let client = try TestSocket.connect(gateway.address)
    client.setReceiveTimeout(seconds: 20)
    let sent = sendPattern(client, seed: 1, count: n)
    client.shutdownWrite()
    let reply = receiveDigest(client)
    client.close()
    #expect(reply.error == nil)
    #expect(reply.received == m)
    #expect(reply.digest == patternDigest(seed: 2, count: m))
    #expect(upstreamGot.value?.0 == n)
    #expect(upstreamGot.value?.1 == sent.digest)
    #expect(gateway.eventually { gateway.active == 0 })
    #expect(gateway.server.total(.closedGracefully) == 1)
    check(gateway)
}
