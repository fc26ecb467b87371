import Glibc
import IgrisPolicy
@testable import IgrisNegotiation
import Synchronization
import Testing

@Suite struct PasswordCheckQueueTests {
    static func source(_ n: UInt8) -> IPAddress { IPAddress(ipv4: 192, 0, 2, n) }

    /// One thread, held busy by a first job until `release`; what runs after it is recorded.
    final class Recorder: @unchecked Sendable {
        let order = Locked<[String]>([])
        let refused = Locked<[String]>([])
        let gate = Locked<Bool>(false)
        let done = Atomic<Int>(0)

        func job(_ name: String, _ source: IPAddress, block: Bool = false) -> PasswordCheckQueue.Job {
            PasswordCheckQueue.Job(source: source, run: {
                while block && !self.gate.withLock({ $0 }) { usleep(1000) }
                self.order.withLock { $0.append(name) }
                self.done.wrappingAdd(1, ordering: .relaxed)
            }, refuse: {
                self.refused.withLock { $0.append(name) }
                self.done.wrappingAdd(1, ordering: .relaxed)
            })
        }

        func waitFor(_ n: Int) -> Bool {
            for _ in 0..<5000 where done.load(ordering: .relaxed) < n { usleep(1000) }
            return done.load(ordering: .relaxed) >= n
        }
    }

    @Test("sources take turns: a newcomer waits behind one check per other source, not behind a flood")
    func roundRobin() {
        let queue = PasswordCheckQueue(threads: 1, capacity: 64, perSource: 8)
        defer { queue.shutdown() }
        let r = Recorder()
        queue.submit(r.job("hold", Self.source(9), block: true))
        // Wait until the thread holds the first job, so the rest queue up behind it.
        for _ in 0..<5000 where queue.waitingCount > 0 { usleep(1000) }
        for i in 0..<6 { queue.submit(r.job("a\(i)", Self.source(1))) }
        for i in 0..<6 { queue.submit(r.job("b\(i)", Self.source(2))) }
        queue.submit(r.job("user", Self.source(3)))
        r.gate.withLock { $0 = true }
        #expect(r.waitFor(14))
        let order = r.order.withLock { $0 }
        #expect(order.prefix(4) == ["hold", "a0", "b0", "user"], "\(order)")
        #expect(r.refused.withLock { $0 }.isEmpty)
    }

    @Test("bounded: past perSource a source's checks are refused; a full queue takes from the heaviest source")
    func bounds() {
        let queue = PasswordCheckQueue(threads: 1, capacity: 6, perSource: 4)
        defer { queue.shutdown() }
        let r = Recorder()
        queue.submit(r.job("hold", Self.source(9), block: true))
        for _ in 0..<5000 where queue.waitingCount > 0 { usleep(1000) }
        for i in 0..<5 { queue.submit(r.job("a\(i)", Self.source(1))) }
        #expect(r.refused.withLock { $0 } == ["a4"], "a fifth check from one source is refused at once")
        queue.submit(r.job("b0", Self.source(2)))
        queue.submit(r.job("b1", Self.source(2)))
        // Full (6): the next newcomer takes the place of the heaviest source's newest check.
        queue.submit(r.job("c0", Self.source(3)))
        #expect(r.refused.withLock { $0 } == ["a4", "a3"])
        #expect(queue.waitingCount == 6 && queue.refusedCount == 2)
        r.gate.withLock { $0 = true }
        #expect(r.waitFor(9))
        #expect(Set(r.order.withLock { $0 }) == ["hold", "a0", "a1", "a2", "b0", "b1", "c0"])
    }
}
