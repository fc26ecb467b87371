import Foundation
import Glibc
import IgrisEngine
import IgrisProtocols
import Testing

/// A client that sends part of its handshake and then waits must cost nothing while it
/// waits. (epoll once spun a core here: the negotiation peeked around the backend, so its
/// readiness cache stayed "readable" after the socket was drained.)
@Suite("Stalled negotiations", .serialized)
struct NegotiationStallTests {
    enum Stall: String, CaseIterable, CustomTestStringConvertible {
        case socks5Greeting, socks5Request, httpHead, proxyV1, proxyV2
        var testDescription: String { rawValue }
    }

    @Test("partial handshakes (SOCKS5 greeting and request, HTTP head, PROXY v1 and v2) waiting for their next byte use < 0.1 s of worker CPU in 2 s",
          arguments: engineBackends)
    func stalledNegotiationsAreIdle(backend: BackendChoice) throws {
        // A handshake timeout well past the test: a loaded machine must not close a stalled
        // client before it is looked at.
        let proxy = try ProxyGateway(backend: backend, handshakeTimeout: 120_000_000_000)
        defer { proxy.stop() }
        let forward = try Gateway(backend: backend, upstream: try SocketAddress.resolve("127.0.0.1:\(try unusedPort())")) {
            $0.listeners[0] = try! acceptingProxyHeaders($0.listeners[0], handshakeTimeout: 120_000_000_000)
        }
        defer { forward.stop() }
        var clients: [(Stall, TestSocket)] = []
        defer { for (_, client) in clients { client.close() } }
        for stall in Stall.allCases {
            let listen = switch stall {
            case .socks5Greeting, .socks5Request: proxy.socks5
            case .httpHead: proxy.http
            case .proxyV1, .proxyV2: forward.address
            }
            let client = try TestSocket.connect(listen)
            clients.append((stall, client))
            client.setReceiveTimeout(seconds: 10)
            let partial: [UInt8]
            switch stall {
            case .socks5Greeting:
                partial = [5, 1]  // version, one method to come
            case .socks5Request:
                client.write([5, 1, 0])
                #expect(try client.readExactly(2) == [5, 0])
                partial = [5, 1, 0, 1, 127]
            case .httpHead:
                partial = Array("CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1".utf8)
            case .proxyV1:
                partial = Array("PROXY TCP4 203.0.113.7".utf8)
            case .proxyV2:
                let header = ProxyProtocol.encode(.proxied(source: .init(address: [203, 0, 113, 7], port: 1),
                                                           destination: .init(address: [192, 0, 2, 1], port: 2)), version: .v2)
                partial = Array(header.prefix(14))
            }
            // Two drips, as a slow client sends them: the first is taken off the socket while
            // the gateway waits for more, then the second arrives on a socket it was polling.
            client.write(Array(partial.prefix(1)))
            let local = try Syscall.localAddress(client.fd)
            #expect(eventually { receiveQueue(localPort: listen.port, remotePort: local.port) == 0 }, "\(stall): the first byte was consumed")
            client.write(Array(partial.dropFirst()))
            #expect(eventually { receiveQueue(localPort: listen.port, remotePort: local.port) == 0 }, "\(stall): the second drip was consumed")
        }
        // These gateways' workers only (other tests' may be running beside them): each worker
        // has recorded its thread, which /proc knows by that id under this process.
        let servers = [proxy.server, forward.server]
        #expect(servers.allSatisfy { $0.statistics.allSatisfy { s in
            let tid = s.load(.threadID)
            return tid > 0 && FileManager.default.fileExists(atPath: "/proc/self/task/\(tid)/stat")
        } })
        let cpu = { servers.map { $0.workerCPUSeconds().reduce(0, +) }.reduce(0, +) }
        let before = cpu()
        usleep(2_000_000)  // the measurement window, not a synchronisation
        let used = cpu() - before
        #expect(used < 0.1, "worker threads used \(used) s of CPU while \(clients.count) clients waited")
        // Still negotiating: each connection is open, nothing was answered or closed.
        for (stall, client) in clients {
            var pending = pollfd(fd: client.fd, events: Int16(POLLIN), revents: 0)
            var byte: UInt8 = 0
            #expect(poll(&pending, 1, 0) == 0,
                    "\(stall): the gateway neither replied nor closed (recv: \(poll(&pending, 1, 0) == 1 ? Syscall.recv(client.fd, &byte, 1) : 0))")
        }
    }
}

/// Bytes queued to read on the IPv4 loopback socket with these ports (the gateway's side of
/// a test connection), from /proc/net/tcp; nil when there is no such socket. The table holds
/// every TIME_WAIT socket the suite left (tens of thousands after the scale tests): its line
/// is found by a byte search, not by splitting the table into strings.
func receiveQueue(localPort: UInt16, remotePort: UInt16) -> Int? {
    guard var table = readProcFile("/proc/net/tcp") else { return nil }
    table.append(0)
    // local_address rem_address st tx_queue:rx_queue, addresses in hexadecimal (127.0.0.1
    // reads 0100007F).
    let needle = String(format: "0100007F:%04X 0100007F:%04X ", localPort, remotePort)
    let offset: Int? = table.withUnsafeBufferPointer { t in
        t.baseAddress!.withMemoryRebound(to: CChar.self, capacity: t.count) { text in
            strstr(text, needle).map { UnsafePointer($0) - text }
        }
    }
    guard let offset else { return nil }
    let rest = table[(offset + needle.utf8.count)...].prefix { $0 != UInt8(ascii: "\n") && $0 != 0 }
    let fields = rest.split(separator: UInt8(ascii: " "))
    guard fields.count > 1 else { return nil }
    let queues = fields[1].split(separator: UInt8(ascii: ":"))
    return queues.count == 2 ? Int(String(decoding: queues[1], as: UTF8.self), radix: 16) : nil
}

/// A /proc file read to its end (they report size 0, and a large one comes in several reads).
func readProcFile(_ path: String) -> [UInt8]? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        bytes.append(contentsOf: chunk[0..<n])
    }
    return bytes
}
