import CLinux
import Glibc
@_spi(Benchmarks) @testable import IgrisEngine
import Testing

/// A splice into a full pipe says EAGAIN before the socket is looked at, even when the socket
/// holds nothing but its end of stream. epoll once took that EAGAIN for "socket drained" and
/// waited for an edge that had already come: the direction never read its EOF, and the
/// bridge never closed (BulkSinkTests saw it about once in eight runs).
@Suite struct SpliceEndOfStreamTests {
    enum Kind: String, CaseIterable, CustomStringConvertible {
        case ioUring, epoll
        var description: String { rawValue }
    }

    @Test("an end of stream behind a full pipe is still read once the pipe drains", arguments: Kind.allCases)
    func endOfStreamBehindFullPipe(kind: Kind) throws {
        let configuration = BackendConfiguration(bufferCount: 16)
        switch kind {
        case .epoll:
            try run(EpollBackend(configuration: configuration))
        case .ioUring:
            let probe = IOUringProbe.run()
            guard probe.usable else {
                Issue.record("io_uring can't be set up here: \(probe.reason)")
                return
            }
            try run(URingBackend(configuration: configuration))
        }
    }

    private func run<Backend: IOBackend>(_ backend: Backend) throws {
        let (client, server) = try connectedPair()
        defer { Syscall.close(client); Syscall.close(server) }
        var ends: [Int32] = [-1, -1]
        // One page: a single slot, taken by the first fragment spliced in.
        var size: Int32 = 4096
        #expect(igris_make_pipe(&ends, &size) == 0 && size == 4096)
        defer { Syscall.close(ends[0]); Syscall.close(ends[1]) }

        backend.pollReadable(fd: server, token: token(.pollIn))
        var byte: UInt8 = 7
        #expect(Glibc.write(client, &byte, 1) == 1)
        #expect(try next(backend)?.result ?? -1 > 0, "the first byte is announced")
        backend.spliceIn(socket: server, pipe: ends[1], length: 65536, token: token(.spliceIn))
        #expect(try next(backend)?.result == 1)

        // The end of stream arrives, and its edge is taken, while the pipe is full.
        #expect(Glibc.shutdown(client, Int32(SHUT_WR)) == 0)
        var fd = pollfd(fd: server, events: Int16(0x2000) /* POLLRDHUP */, revents: 0)
        #expect(Glibc.poll(&fd, 1, 10_000) == 1)
        try backend.waitForCompletions(timeoutNanoseconds: 0)
        backend.drainCompletions { _ in }
        backend.spliceIn(socket: server, pipe: ends[1], length: 65536, token: token(.spliceIn))
        #expect(try next(backend)?.result == -EAGAIN, "a full pipe says EAGAIN")

        #expect(Glibc.read(ends[0], &byte, 1) == 1)
        backend.pollReadable(fd: server, token: token(.pollIn))
        let poll = try next(backend)
        #expect(poll != nil && poll!.result > 0, "the end of stream is announced once the pipe has room")
        backend.spliceIn(socket: server, pipe: ends[1], length: 65536, token: token(.spliceIn))
        #expect(try next(backend)?.result == 0, "and read")
    }

    private func token(_ kind: OperationKind) -> OperationToken {
        OperationToken(index: 0, generation: 0, kind: kind)
    }

    /// The next completion, waiting up to about 5 s for it (only a failing backend waits).
    private func next<Backend: IOBackend>(_ backend: Backend) throws -> Completion? {
        for _ in 0..<50 {
            var got: Completion?
            backend.drainCompletions { if got == nil { got = $0 } }
            if let got { return got }
            try backend.waitForCompletions(timeoutNanoseconds: 100_000_000)
        }
        return nil
    }

    private func connectedPair() throws -> (client: Int32, server: Int32) {
        let listener = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
        defer { Syscall.close(listener) }
        try Syscall.bind(listener, SocketAddress.resolve("127.0.0.1:0"))
        try Syscall.listen(listener, backlog: 1)
        let address = try Syscall.localAddress(listener)
        let client = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
        #expect(address.withSockAddr { Glibc.connect(client, $0, $1) } == 0)
        let server = Syscall.accept(listener)
        #expect(server >= 0)
        return (client, server)
    }
}
