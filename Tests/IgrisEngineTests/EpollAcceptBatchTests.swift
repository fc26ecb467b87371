import Glibc
@_spi(Benchmarks) @testable import IgrisEngine
import Testing

/// The worker arms a multishot accept only while every worker's burst fits the room left
/// (`Worker.multishotMinimumRoom`), so a burst must be bounded between two deliveries, not
/// per run of the listener: armed from a completion, then readable, then retried, one
/// listener runs up to three times before the worker sees what it took.
@Suite struct EpollAcceptBatchTests {
    @Test("epoll's multishot accept takes at most its burst between two deliveries, however often the listener runs")
    func burstIsPerDelivery() throws {
        let listener = try Syscall.streamSocket(family: AF_INET, nonBlocking: true)
        defer { Syscall.close(listener) }
        try Syscall.bind(listener, SocketAddress.resolve("127.0.0.1:0"))
        try Syscall.listen(listener, backlog: 512)
        let address = try Syscall.localAddress(listener)
        let waiting = 200
        var clients: [Int32] = []
        defer { for c in clients { Syscall.close(c) } }
        for _ in 0..<waiting {
            let c = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
            clients.append(c)
            let rc = address.withSockAddr { Glibc.connect(c, $0, $1) }
            #expect(rc == 0)
        }
        let backend = try EpollBackend(configuration: BackendConfiguration(bufferCount: 64))
        let token = OperationToken(index: 0, generation: 0, kind: .accept)
        // Armed: runs at once. Then two waits before anything is delivered: the listener is
        // readable (backlog left) and on the retry list.
        backend.accept(listener: listener, multishot: true, token: token)
        try backend.waitForCompletions(timeoutNanoseconds: 0)
        try backend.waitForCompletions(timeoutNanoseconds: 0)
        var batches: [Int] = []
        var accepted: [Int32] = []
        defer { for a in accepted { Syscall.close(a) } }
        for _ in 0..<20 where accepted.count < waiting {
            var n = 0
            backend.drainCompletions { c in
                #expect(c.result >= 0, "accept failed: \(c.result)")
                if c.result >= 0 { accepted.append(c.result) }
                n += 1
            }
            batches.append(n)
            try backend.waitForCompletions(timeoutNanoseconds: 0)
        }
        #expect(accepted.count == waiting)
        #expect(batches.allSatisfy { $0 <= backend.acceptBurst }, "batches: \(batches)")
    }
}
