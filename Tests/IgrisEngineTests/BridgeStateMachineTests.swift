import Glibc
@_spi(Benchmarks) @testable import IgrisEngine
import Logging
import Testing

/// A worker with one forward listener on a `ScriptedBackend`.
final class ScriptedWorker {
    let backend: ScriptedBackend
    let worker: Worker<ScriptedBackend>
    let statistics = WorkerStatistics(listeners: 1)

    init(buffers: Int = 4, splice: SpliceMode = .never) throws {
        backend = try ScriptedBackend(bufferCount: buffers)
        let listener = try Syscall.streamSocket(family: AF_INET)
        var rule = ListenerRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: try SocketAddress.resolve("127.0.0.1:9"), name: "t")
        rule.splice = splice
        rule.connectTimeoutNanoseconds = 60_000_000_000
        rule.idleTimeoutNanoseconds = .some(nil)
        let configuration = WorkerConfiguration(index: 0, listeners: [BoundListener(fd: listener, rule: rule, budget: nil)],
                                                backend: BackendConfiguration(), drainTimeoutNanoseconds: 1_000_000_000, slotCapacity: 8)
        worker = Worker(backend: backend, configuration: configuration, control: try WorkerControl(), statistics: statistics,
                        budget: ConnectionBudget(limit: 100), logger: Logger(label: "scripted"))
        worker.start()
        _ = backend.take { if case .pollReadable = $0 { return true } else { return false } }  // the wake-up poll
    }

    func turn() { _ = try! worker.turn() }

    /// Accepts a client and completes its upstream connect: a bridging connection.
    /// A bridged pair of unconnected sockets. Their send buffers are set (`sendBuffer`)
    /// because the worker reads no more than a destination's send buffer takes.
    func bridge(sendBuffer: Int32 = 256 * 1024, upstreamSendBuffer: Int32? = nil) throws -> (client: Int32, upstream: Int32) {
        let client = try Syscall.streamSocket(family: AF_INET)
        Self.setSendBuffer(client, sendBuffer)
        let accept = try #require(backend.submitted.first { if case .accept = $0.operation { return true } else { return false } })
        backend.complete(accept.token, client, more: true)
        turn()
        let connect = try #require(backend.takeOne { if case .connect = $0 { return true } else { return false } })
        guard case .connect(let upstream) = connect.operation else { throw TestError() }
        Self.setSendBuffer(upstream, upstreamSendBuffer ?? sendBuffer)
        backend.complete(connect.token, 0)
        turn()
        return (client, upstream)
    }

    static func setSendBuffer(_ fd: Int32, _ bytes: Int32) {
        var value = bytes
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    func take(_ operation: ScriptedBackend.Operation) -> OperationToken? { backend.takeOne { $0 == operation }?.token }

    var active: Int { worker.table.active }
}

struct TestError: Error {}

@Suite("Bridge state machine (scripted backend)")
struct BridgeStateMachineTests {
    @Test("half-close: the shutdown waits for the send in flight; the second EOF closes both sockets (the close sends that FIN)")
    func halfCloseOrdering() throws {
        let w = try ScriptedWorker()
        let (client, upstream) = try w.bridge()
        let recvClient = try #require(w.take(.recv(client)))
        let recvUpstream = try #require(w.take(.recv(upstream)))

        w.backend.completeRecv(recvClient, Array(repeating: 7, count: 100))
        w.turn()
        let send = try #require(w.backend.takeSend(to: upstream, offset: 0, length: 100))
        let recvClient2 = try #require(w.take(.recv(client)), "one recv ahead of the send")

        w.backend.complete(recvClient2, 0)  // client EOF while its bytes are still being sent
        w.turn()
        #expect(w.take(.shutdownWrite(upstream)) == nil, "no FIN before the bytes ahead of it")
        w.backend.complete(send.token, 100)
        w.turn()
        let shutdownUpstream = try #require(w.take(.shutdownWrite(upstream)))
        w.backend.complete(shutdownUpstream, 0)
        w.turn()
        #expect(w.active == 1, "the other direction still flows")

        w.backend.complete(recvUpstream, 0)
        w.turn()
        #expect(w.take(.shutdownWrite(client)) == nil, "no shutdown: both peers have sent their FIN")
        #expect(w.backend.take { if case .close(_, _, false) = $0 { return true } else { return false } }.count == 2)
        w.turn()
        #expect(w.active == 0)
        #expect(w.statistics.load(.closedGracefully) == 1)
        #expect(w.backend.buffers.inUse == 0)
    }

    @Test("ENOBUFS: the direction waits without a recv armed, and is re-armed once a buffer returns")
    func bufferExhaustionWaitsAndRearms() throws {
        let w = try ScriptedWorker(buffers: 1)
        let (client, upstream) = try w.bridge()
        let recv = try #require(w.take(.recv(client)))
        let recvUpstream = try #require(w.take(.recv(upstream)))
        w.backend.completeRecv(recv, [1, 2, 3])
        w.turn()
        let send = try #require(w.backend.takeSend(to: upstream, length: 3))
        #expect(w.take(.recv(client)) == nil, "the pool is under pressure: no reading ahead")
        w.backend.completeRecv(recvUpstream, [4])  // the pool's only buffer is being sent: -ENOBUFS
        w.turn()
        #expect(w.take(.recv(upstream)) == nil, "no recv while no buffer can be had")
        #expect(w.statistics.load(.bufferExhaustions) == 1)
        w.backend.complete(send.token, 3)
        w.turn()
        #expect(w.take(.recv(upstream)) != nil, "re-armed in the turn the buffer came back")
        #expect(w.take(.recv(client)) != nil, "and the sender reads on")
    }

    @Test("buffer waiters woken without data do not leave the rest waiting while buffers are free")
    func bufferWaitersDrainWithoutOtherCompletions() throws {
        let w = try ScriptedWorker(buffers: 1)
        var clients: [Int32] = []
        var upstreams: [Int32] = []
        for _ in 0..<3 {
            let (client, upstream) = try w.bridge()
            clients.append(client)
            upstreams.append(upstream)
        }
        // The first client's bytes take the only buffer; the other two find the pool empty.
        w.backend.completeRecv(try #require(w.take(.recv(clients[0]))), [1])
        w.turn()
        let send = try #require(w.backend.takeSend(to: upstreams[0], length: 1))
        w.backend.completeRecv(try #require(w.take(.recv(clients[1]))), [2])
        w.backend.completeRecv(try #require(w.take(.recv(clients[2]))), [3])
        w.turn()
        #expect(w.statistics.load(.bufferExhaustions) == 2)
        // The buffer comes back: one waiter is woken (its recv may find nothing and never
        // complete); the loop must come round again at once for the other.
        w.backend.complete(send.token, 1)
        w.turn()
        #expect(w.take(.recv(clients[1])) != nil)
        #expect(w.worker.nextTimeout() == 0, "a waiter is left and a buffer is free")
        w.turn()
        #expect(w.take(.recv(clients[2])) != nil)
        #expect(w.worker.nextTimeout() != 0, "nothing left to wake")
    }

    @Test("a short send is resumed from where it stopped, in the same buffer")
    func shortSends() throws {
        let w = try ScriptedWorker()
        let (client, upstream) = try w.bridge()
        let recv = try #require(w.take(.recv(client)))
        w.backend.completeRecv(recv, Array(repeating: 9, count: 1000))
        w.turn()
        let first = try #require(w.backend.takeSend(to: upstream, offset: 0, length: 1000))
        guard case .send(_, let buffer, _, _) = first.operation else { throw TestError() }
        w.backend.complete(first.token, 300)
        w.turn()
        let rest = try #require(w.take(.send(fd: upstream, buffer: buffer, offset: 300, length: 700)))
        #expect(w.backend.buffers.inUse == 1)
        w.backend.complete(rest, 700)
        w.turn()
        #expect(w.backend.buffers.inUse == 0, "the buffer goes back once every byte is sent")
    }

    @Test("a destination without room: no recv and no buffer held, a wait for room instead; the close cancels it")
    func fullDestinationWaitsForRoom() throws {
        let w = try ScriptedWorker()
        for abortWhileWaiting in [false, true] {
            w.backend.submitted.removeAll { if case .accept = $0.operation { return false } else { return true } }
            // The upstream's send buffer is the smallest the kernel allows: no room in it.
            let (client, upstream) = try w.bridge(upstreamSendBuffer: 1)
            let upstreamRecv = try #require(w.take(.recv(upstream)), "the client's side has room")
            #expect(w.take(.recv(client)) == nil, "no read while the destination has no room")
            let wait = try #require(w.take(.pollWritable(upstream)), "a wait for room instead")
            #expect(w.backend.buffers.inUse == 0, "nothing held while waiting")
            if abortWhileWaiting {
                w.backend.complete(upstreamRecv, -ECONNRESET)
                w.turn()
                let closes = w.backend.take { if case .close = $0 { return true } else { return false } }.map(\.operation)
                #expect(closes.contains(.close(fd: upstream, pending: [.room], abort: true)), "the wait for room is named: \(closes)")
            } else {
                w.backend.complete(wait, Int32(POLLOUT))
                w.turn()
                #expect(w.take(.recv(client)) != nil, "woken: a small read, not another wait")
            }
        }
        #expect(w.statistics.load(.roomWaits) == 2)
    }

    @Test("the reserve: once the main buffers are all lent, a read into an empty destination takes a reserve buffer; recvs armed before cannot")
    func reserveServesEmptyDestinations() throws {
        let w = try ScriptedWorker(buffers: 8)  // 7 main buffers, 1 reserve
        #expect(w.backend.buffers.mainCount == 7 && w.backend.buffers.reserveCount == 1)
        var pinned: [ScriptedBackend.Submitted] = []
        var upstreamRecvs: [OperationToken] = []
        for _ in 0..<7 {
            let (client, upstream) = try w.bridge()
            upstreamRecvs.append(try #require(w.take(.recv(upstream))))
            w.backend.completeRecv(try #require(w.take(.recv(client))), [1, 2, 3])
            w.turn()
            pinned.append(try #require(w.backend.takeSend(to: upstream, length: 3)))  // never completes
        }
        #expect(w.backend.buffers.inReserve, "the main set is all lent")
        // A recv armed before: the main group is empty, whatever the reserve holds.
        w.backend.completeRecv(upstreamRecvs[0], [9])
        w.turn()
        #expect(w.statistics.load(.bufferExhaustions) == 1)
        #expect(w.backend.buffers.reserveInUse == 0, "an earlier recv never lands in the reserve")
        // A new connection, its destinations empty: it reads, from the reserve.
        let (client, upstream) = try w.bridge()
        let recv = try #require(w.take(.recv(client)))
        #expect(w.backend.reserveRecvs.contains(recv.raw))
        w.backend.completeRecv(recv, [7, 7])
        w.turn()
        #expect(w.backend.buffers.reserveInUse == 1)
        let send = try #require(w.backend.takeSend(to: upstream, length: 2))
        w.backend.complete(send.token, 2)
        w.turn()
        #expect(w.backend.buffers.reserveInUse == 0, "back to the reserve")
        _ = try #require(w.take(.recv(client)), "and it reads on")
        // Main buffers free again: the reserve mode ends.
        w.backend.complete(pinned[0].token, 3)
        w.turn()
        #expect(!w.backend.buffers.inReserve)
    }

    @Test("a destination that takes less than a whole send stops the read-ahead until it takes one whole again")
    func congestedDestinationStopsReadAhead() throws {
        let w = try ScriptedWorker()
        let (client, upstream) = try w.bridge()
        w.backend.completeRecv(try #require(w.take(.recv(client))), Array(repeating: 1, count: 1000))
        w.turn()
        let first = try #require(w.backend.takeSend(to: upstream, offset: 0, length: 1000))
        let ahead = try #require(w.take(.recv(client)), "reads ahead while the destination keeps up")
        w.backend.complete(first.token, 400)  // a slow reader: part of it
        w.turn()
        let rest = try #require(w.backend.takeSend(to: upstream, offset: 400, length: 600))
        w.backend.completeRecv(ahead, Array(repeating: 2, count: 1000))  // read before the congestion showed
        w.turn()
        w.backend.complete(rest.token, 600)
        w.turn()
        let queued = try #require(w.backend.takeSend(to: upstream, offset: 0, length: 1000))
        #expect(w.take(.recv(client)) == nil, "congested: no read-ahead, the bytes wait in the client's socket")
        #expect(w.backend.buffers.inUse == 1, "one buffer, the one being sent")
        w.backend.complete(queued.token, 1000)  // taken whole at the first try
        w.turn()
        let next = try #require(w.take(.recv(client)), "the destination keeps up again: read on")
        w.backend.completeRecv(next, [3])
        w.turn()
        _ = try #require(w.backend.takeSend(to: upstream, offset: 0, length: 1))
        #expect(w.take(.recv(client)) != nil, "and ahead again")
    }

    @Test("an abort names the splice in flight to the backend and keeps the slot until it completes")
    func closeWaitsForSplice() throws {
        let w = try ScriptedWorker(splice: .always)
        let (client, upstream) = try w.bridge()
        let pollClient = try #require(w.take(.pollReadable(client)))
        let pollUpstream = try #require(w.take(.pollReadable(upstream)))
        w.backend.complete(pollClient, Int32(POLLIN))
        w.turn()
        let splice = try #require(w.backend.takeOne { if case .spliceIn(client, _) = $0 { return true } else { return false } })
        w.backend.complete(pollUpstream, -ECONNRESET)
        w.turn()
        let closes = w.backend.take { if case .close = $0 { return true } else { return false } }.map(\.operation)
        #expect(closes.contains(.close(fd: client, pending: [.spliceIn], abort: true)))
        #expect(closes.contains(.close(fd: upstream, pending: [], abort: true)))
        w.turn()
        #expect(w.active == 1, "the slot is held while the splice is in flight")
        w.backend.complete(splice.token, 500)
        w.turn()
        #expect(w.active == 0)
        #expect(w.statistics.load(.spliceBytesDropped) == 500, "bytes left in the pipe of an aborted bridge are counted")
    }

    @Test("a late completion for a slot that was since reused is dropped, and its buffer returned")
    func staleCompletionForReusedSlot() throws {
        let w = try ScriptedWorker()
        let (client, upstream) = try w.bridge()
        let staleRecv = try #require(w.take(.recv(upstream)))
        let recv = try #require(w.take(.recv(client)))
        w.backend.complete(recv, -ECONNRESET)
        w.turn()
        let closes = w.backend.take { if case .close = $0 { return true } else { return false } }.map(\.operation)
        #expect(closes.contains(.close(fd: upstream, pending: [.recv], abort: true)))
        w.turn()
        #expect(w.active == 1, "held until the cancelled recv completes")
        w.backend.complete(staleRecv, -ECANCELED)
        w.turn()
        #expect(w.active == 0)

        let (client2, upstream2) = try w.bridge()
        #expect(OperationToken(raw: try #require(w.take(.recv(client2))).raw).index == staleRecv.index, "the slot was reused")
        _ = w.take(.recv(upstream2))
        // The old recv's token again, now with bytes: an older generation, so it is dropped.
        w.backend.completeRecv(staleRecv, [1, 2, 3])
        w.turn()
        #expect(w.backend.buffers.inUse == 0, "the stale completion's buffer went back")
        let armed = w.backend.submitted.filter { if case .accept = $0.operation { return false } else { return true } }
        #expect(armed.isEmpty, "nothing was sent or armed for it: \(armed.map(\.operation))")
        #expect(w.active == 1)
    }

    @Test("a burst of completions in one turn (as after a CQ overflow is flushed) loses none")
    func completionBurst() throws {
        let w = try ScriptedWorker(buffers: 16)
        var bridges: [(Int32, Int32)] = []
        for _ in 0..<4 { bridges.append(try w.bridge()) }
        var sends = 0
        for (client, upstream) in bridges {
            w.backend.completeRecv(try #require(w.take(.recv(client))), [1])
            w.backend.completeRecv(try #require(w.take(.recv(upstream))), [2, 2])
        }
        w.backend.completionOverflows = 3
        w.turn()
        for (client, upstream) in bridges {
            sends += w.backend.take { if case .send(upstream, _, 0, 1) = $0 { return true } else { return false } }.count
            sends += w.backend.take { if case .send(client, _, 0, 2) = $0 { return true } else { return false } }.count
        }
        #expect(sends == 8)
        #expect(w.statistics.load(.completionOverflows) == 3)
        #expect(w.backend.buffers.inUse == 8)
    }
}
