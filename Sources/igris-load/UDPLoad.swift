import ArgumentParser
import CLinux
import Glibc
import IgrisEngine
import IgrisPolicy
import IgrisProtocols
import Synchronization

/// `igris-load udp-echo`: UDP echo server, one SO_REUSEPORT socket per thread. Prints
/// `listening HOST:PORT` once ready.
struct UDPEchoServer: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "udp-echo", abstract: "UDP echo server.")

    @Option(help: "Address to listen on (port 0: any free port).")
    var listen: String = "127.0.0.1:0"

    @Option(help: "Threads, each with its own SO_REUSEPORT socket.")
    var threads: Int = 1

    func run() throws {
        let fds = try announcedSockets(listen, threads: threads, kind: .datagram)
        let threads = fds.map { fd in
            WorkerThread.spawn(name: "udp-echo") {
                var buffer = [UInt8](repeating: 0, count: 65536)
                var from = sockaddr_storage()
                while true {
                    var size = socklen_t(MemoryLayout<sockaddr_storage>.size)
                    let n = withUnsafeMutablePointer(to: &from) { p in
                        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, &buffer, buffer.count, 0, $0, &size) }
                    }
                    if n < 0 { continue }
                    _ = withUnsafePointer(to: &from) { p in
                        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sendto(fd, buffer, n, 0, $0, size) }
                    }
                }
            }
        }
        for t in threads { pthread_join(t, nil) }
    }
}

/// `igris-load udp`: datagrams through a SOCKS5 UDP association per thread (or straight to
/// the target with `--direct`) to an echo server, `--window` in flight per thread; prints
/// datagrams echoed per second and how many were lost (not echoed within 100 ms).
struct UDPClients: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "udp", abstract: "UDP datagrams through SOCKS5 UDP ASSOCIATE.")

    @Option(help: "SOCKS5 proxy, HOST:PORT (no authentication).")
    var socks5: String?

    @Flag(help: "Send to the target directly (the reference).")
    var direct = false

    @Option(help: "The UDP echo server, HOST:PORT.")
    var target: String

    @Option(help: "Payload bytes per datagram.")
    var size: Int = 64

    @Option(help: "Threads, each with its own association.")
    var threads: Int = 4

    @Option(help: "Datagrams in flight per thread.")
    var window: Int = 8

    @Option(help: "Seconds to run.")
    var seconds: Double = 5

    func run() throws {
        let target = try resolveTarget(self.target)
        let proxy = try socks5.map(resolveTarget)
        guard direct || proxy != nil else { throw ValidationError("give --socks5 HOST:PORT or --direct") }
        let echoed = Atomic<Int>(0)
        let lost = Atomic<Int>(0)
        let failures = Atomic<Int>(0)
        let deadline = Syscall.monotonicNanoseconds() + UInt64(seconds * 1e9)
        let size = size, window = max(1, window)
        let threads = (0..<max(1, threads)).map { _ in
            WorkerThread.spawn(name: "udp-client") {
                do {
                    let (e, l) = try Self.flow(proxy: proxy, target: target, size: size, window: window, deadline: deadline)
                    echoed.wrappingAdd(e, ordering: .relaxed)
                    lost.wrappingAdd(l, ordering: .relaxed)
                } catch {
                    failures.wrappingAdd(1, ordering: .relaxed)
                    writeStandardError("udp flow failed: \(error)\n")
                }
            }
        }
        for t in threads { pthread_join(t, nil) }
        let n = echoed.load(ordering: .relaxed)
        printTable([("datagrams_per_s", String(Int(Double(n) / seconds))), ("echoed", String(n)),
                    ("lost", String(lost.load(ordering: .relaxed))), ("failed_flows", String(failures.load(ordering: .relaxed)))])
    }

    /// One association (or a direct socket): keeps `window` datagrams in flight until the deadline.
    static func flow(proxy: SocketAddress?, target: SocketAddress, size: Int, window: Int, deadline: UInt64) throws -> (Int, Int) {
        var relay = target
        var control: ClientSocket? = nil
        if let proxy {
            let c = try ClientSocket(proxy)
            control = c
            var reply = [UInt8](repeating: 0, count: 10)
            let greeting: [UInt8] = [5, 1, 0], request: [UInt8] = [5, 3, 0, 1, 0, 0, 0, 0, 0, 0]
            guard c.writeAll(greeting, greeting.count), c.readExactly(&reply, 2), reply[1] == 0,
                  c.writeAll(request, request.count), c.readExactly(&reply, 10), reply[1] == 0, reply[3] == 1 else {
                throw SyscallError("UDP ASSOCIATE refused", errno: EPROTO)
            }
            relay = SocketAddress(ip: IPAddress(ipv4: reply[4], reply[5], reply[6], reply[7]), port: UInt16(reply[8]) << 8 | UInt16(reply[9]))
        }
        defer { control?.close() }
        let fd = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        defer { Glibc.close(fd) }
        try Syscall.bind(fd, SocketAddress(ip: IPAddress(ipv4: 127, 0, 0, 1), port: 0))
        var tv = timeval(tv_sec: 0, tv_usec: 100_000)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let v = UInt32(truncatingIfNeeded: target.ipAddress.low)
        let ipv4 = Socks5.Address.ipv4(UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF))
        let header: [UInt8] = proxy == nil ? [] : Socks5UDP.header(from: ipv4, port: target.port)
        let datagram = header + [UInt8](repeating: 0x5A, count: size)
        var buffer = [UInt8](repeating: 0, count: 65536)
        var echoed = 0, lost = 0, inFlight = 0
        while Syscall.monotonicNanoseconds() < deadline {
            while inFlight < window {
                _ = datagram.withUnsafeBytes { b in relay.withSockAddr { sendto(fd, b.baseAddress, b.count, 0, $0, $1) } }
                inFlight += 1
            }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n == datagram.count {
                echoed += 1
                inFlight -= 1
            } else if n < 0 {
                lost += inFlight
                inFlight = 0
            }
        }
        return (echoed, lost)
    }
}
