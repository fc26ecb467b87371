import Glibc
@_spi(Benchmarks) @testable import IgrisEngine
import Testing

@Suite struct SocketAddressTests {
    @Test func parsesIPv4AndIPv6() throws {
        #expect(try SocketAddress.resolve("127.0.0.1:8080").description == "127.0.0.1:8080")
        #expect(try SocketAddress.resolve("[::1]:443").description == "[::1]:443")
        #expect(try SocketAddress.resolve("[::1]:443").family == AF_INET6)
        #expect(try SocketAddress.resolve("127.0.0.1:8080").port == 8080)
    }

    @Test func rejectsMalformed() {
        for text in ["", "127.0.0.1", ":80", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:65536", "[::1:80", "[::1]80", "::1:80", "1.2.3.4:-1"] {
            #expect(throws: AddressError.self, "\(text)") { try SocketAddress.resolve(text) }
        }
    }

    @Test func unresolvableNamesAreReported() {
        #expect(throws: AddressError.self) { try SocketAddress.resolve("no-such-host.invalid:80") }
    }
}

@Suite struct OperationTokenTests {
    @Test func roundTripsIndexGenerationKindDirection() {
        let t = OperationToken(index: 123_456, generation: 0xAB_CDEF, kind: .send, direction: 1)
        #expect(t.index == 123_456)
        #expect(t.generation == 0xAB_CDEF)
        #expect(t.kind == .send)
        #expect(t.direction == 1)
        #expect(OperationToken(raw: t.raw) == t)
        #expect(OperationToken(index: 0, generation: 0x1_000_001, kind: .recv).generation == 1)
        #expect(OperationToken(index: 7, generation: 1, kind: .recv).direction == 0)
        // Bit 63 is the backends' own: an index never reaches it.
        #expect(OperationToken(index: .max, generation: 0, kind: .recv).raw & (1 << 63) == 0)
    }
}

@Suite struct ConnectionTableTests {
    @Test func reusesSlotsWithANewGeneration() {
        let table = ConnectionTable(capacity: 2)
        let a = table.allocate()!
        let b = table.allocate()!
        #expect(table.allocate() == nil)
        let generation = table.pointer(a).pointee.generation
        table.release(a)
        #expect(table.active == 1)
        let c = table.allocate()!
        #expect(c == a)
        #expect(table.pointer(c).pointee.generation == generation + 1)
        table.release(b)
        table.release(c)
        #expect(table.active == 0)
    }

    @Test func slotStaysSmall() {
        // An idle bridge's whole user-space state; DESIGN targets well under 1 KiB.
        #expect(MemoryLayout<ConnectionSlot>.stride <= 216, "stride \(MemoryLayout<ConnectionSlot>.stride)")
    }
}

@Suite struct TimerWheelTests {
    @Test func firesInDeadlineOrderAndOnlyWhenDue() {
        let table = ConnectionTable(capacity: 8)
        let slots = (0..<4).map { _ in table.allocate()! }
        let start: UInt64 = 1_000_000_000_000
        var wheel = TimerWheel(now: start)
        wheel.schedule(slots[0], deadline: start + 50_000_000, table: table)
        wheel.schedule(slots[1], deadline: start + 20_000_000, table: table)
        wheel.schedule(slots[2], deadline: start + 30_000_000_000, table: table)  // beyond one revolution
        wheel.schedule(slots[3], deadline: start + 40_000_000, table: table)
        wheel.cancel(slots[3], table: table)
        #expect(wheel.scheduled == 3)
        var fired: [Int32] = []
        wheel.expire(now: start + 25_000_000, table: table, into: &fired)
        #expect(fired == [slots[1]])
        wheel.expire(now: start + 60_000_000, table: table, into: &fired)
        #expect(fired == [slots[1], slots[0]])
        // One revolution (10.24 s) later the far timer's bucket comes round but it is not due.
        wheel.expire(now: start + 10_300_000_000, table: table, into: &fired)
        #expect(fired.count == 2)
        #expect(wheel.nanosecondsUntilNextTimer(now: start + 10_300_000_000) != nil)
        wheel.expire(now: start + 30_000_000_000, table: table, into: &fired)
        #expect(fired == [slots[1], slots[0], slots[2]])
        #expect(wheel.scheduled == 0)
        #expect(wheel.nanosecondsUntilNextTimer(now: start + 30_000_000_000) == nil)
    }
}

@Suite struct BackendSelectionTests {
    @Test func epollIsAlwaysAvailable() throws {
        let (kind, _) = try Server.selectBackend(.epoll)
        #expect(kind == .epoll)
    }

    @Test func autoExplainsItsChoice() throws {
        let (kind, reason) = try Server.selectBackend(.auto)
        let probe = IOUringProbe.run()
        #expect(kind == (probe.usable ? .ioUring : .epoll))
        #expect(!reason.isEmpty)
    }

    @Test func ioUringIsUsableHere() {
        // This machine and CI run Linux 6.x with io_uring allowed: the io_uring tests must run.
        let probe = IOUringProbe.run()
        #expect(probe.usable, "io_uring unusable: \(probe.reason)")
    }
}

@Suite struct TimerWheelWakeTests {
    @Test("waking after nanosecondsUntilNextTimer fires a deadline that is not tick-aligned")
    func wakeTimeCoversDeadline() {
        let table = ConnectionTable(capacity: 1)
        let s = table.allocate()!
        let start: UInt64 = 5_000_000_123
        var wheel = TimerWheel(now: start)
        wheel.schedule(s, deadline: start + 300_456_789, table: table)
        let wait = wheel.nanosecondsUntilNextTimer(now: start)!
        #expect(wait >= 300_456_789)
        var fired: [Int32] = []
        wheel.expire(now: start + wait, table: table, into: &fired)
        #expect(fired == [s])
    }

    @Test("the next wake is the earliest timer's tick whatever was searched before: earlier, later and far timers added after a search")
    func searchRestartsWhereTimersAreAdded() {
        let table = ConnectionTable(capacity: 4)
        let slots = (0..<4).map { _ in table.allocate()! }
        let start: UInt64 = 7_000_000_000_000
        let tick: UInt64 = 10_000_000
        var wheel = TimerWheel(now: start)
        wheel.schedule(slots[0], deadline: start + 500 * tick, table: table)
        #expect(wheel.nanosecondsUntilNextTimer(now: start) == 500 * tick)
        // Earlier than where the last search stopped.
        wheel.schedule(slots[1], deadline: start + 20 * tick, table: table)
        #expect(wheel.nanosecondsUntilNextTimer(now: start) == 20 * tick)
        wheel.cancel(slots[1], table: table)
        #expect(wheel.nanosecondsUntilNextTimer(now: start) == 500 * tick)
        // Beyond a revolution: its bucket comes round at tick 1500 - 1024 = 476, before 500.
        wheel.schedule(slots[2], deadline: start + 1500 * tick, table: table)
        #expect(wheel.nanosecondsUntilNextTimer(now: start) == 476 * tick)
        var fired: [Int32] = []
        wheel.expire(now: start + 476 * tick, table: table, into: &fired)
        #expect(fired.isEmpty)
        #expect(wheel.nanosecondsUntilNextTimer(now: start + 476 * tick) == 24 * tick)
        wheel.expire(now: start + 500 * tick, table: table, into: &fired)
        #expect(fired == [slots[0]])
        // A timer added after the far one's bucket was passed: found, and the far one after it.
        wheel.schedule(slots[3], deadline: start + 700 * tick, table: table)
        #expect(wheel.nanosecondsUntilNextTimer(now: start + 500 * tick) == 200 * tick)
        wheel.expire(now: start + 700 * tick, table: table, into: &fired)
        #expect(fired == [slots[0], slots[3]])
        #expect(wheel.nanosecondsUntilNextTimer(now: start + 700 * tick) == 800 * tick)
        wheel.expire(now: start + 1500 * tick, table: table, into: &fired)
        #expect(fired == [slots[0], slots[3], slots[2]])
        #expect(wheel.nanosecondsUntilNextTimer(now: start + 1500 * tick) == nil)
    }
}

@Suite struct SocketAddressConversionTests {
    @Test("socket addresses convert to and from the ACL's 16-byte form")
    func ipAddressConversion() throws {
        let v4 = try SocketAddress.resolve("10.1.2.3:99")
        #expect(v4.ipAddress.description == "10.1.2.3")
        #expect(SocketAddress(ip: v4.ipAddress, port: 99) == v4)
        let v6 = try SocketAddress.resolve("[2001:db8::1]:443")
        #expect(SocketAddress(ip: v6.ipAddress, port: 443).description == "[2001:db8::1]:443")
        #expect(v6.withPort(8443).description == "[2001:db8::1]:8443")
    }
}

@Suite struct StatisticsTests {
    @Test func listenerCounterCountMatchesItsCases() {
        #expect(WorkerStatistics.ListenerCounter.count == WorkerStatistics.ListenerCounter.allCases.count)
    }

    @Test("connect latency lands in the first bucket whose bound it does not exceed")
    func latencyBuckets() {
        let s = WorkerStatistics(listeners: 1)
        s.recordConnectLatency(50_000)
        s.recordConnectLatency(100_000)
        s.recordConnectLatency(100_001)
        s.recordConnectLatency(60_000_000_000)
        let (buckets, sum) = s.connectLatency()
        #expect(buckets[0] == 2 && buckets[1] == 1 && buckets.last == 1)
        #expect(sum == 60_000_250_001)
    }
}
