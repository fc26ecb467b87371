import Foundation
import Glibc
import IgrisEngine
import IgrisProtocols
import Testing

/// PROXY protocol on forward listeners: accepted from a balancer (strict), sent upstream.
@Suite("PROXY protocol", .serialized)
struct ProxyProtocolIntegrationTests {
    /// An upstream that reads a PROXY header, reports it, then echoes.
    static func headerReadingUpstream(_ seen: SharedBox<[ProxyProtocol.Header]>) throws -> TestUpstream {
        try TestUpstream { socket in
            var parser = ProxyProtocol.Parser()
            var byte: UInt8 = 0
            while true {
                guard withUnsafeMutableBytes(of: &byte, { socket.read(into: $0) }) == 1 else { socket.close(); return }
                let (_, event) = withUnsafeBytes(of: byte) { parser.feed($0) }
                if case .header(let h) = event { seen.update { $0.append(h) }; break }
                if case .failure = event { socket.close(); return }
            }
            echo(socket)
        }
    }

    @Test("accept v1/v2 from a balancer, send the original client on as v2 or v1; no header → closed", arguments: engineBackends)
    func acceptAndSend(backend: BackendChoice) throws {
        let seen = SharedBox<[ProxyProtocol.Header]>([])
        let upstream = try Self.headerReadingUpstream(seen)
        defer { upstream.stop() }
        for (incoming, outgoing) in [(ProxyProtocol.Version.v1, ProxyProtocol.Version.v2), (.v2, .v1)] {
            let gateway = try Gateway(backend: backend, upstream: upstream.address) {
                $0.listeners[0].sendProxyProtocol = outgoing
                $0.listeners[0] = try! acceptingProxyHeaders($0.listeners[0])
            }
            defer { gateway.stop() }
            let original = ProxyProtocol.Header.proxied(source: .init(address: [203, 0, 113, 7], port: 51234),
                                                        destination: .init(address: [192, 0, 2, 1], port: 443))
            let s = try TestSocket.connect(gateway.address)
            s.setReceiveTimeout(seconds: 10)
            s.write(ProxyProtocol.encode(original, version: incoming) + Array("hello".utf8))
            #expect(try s.readExactly(5) == Array("hello".utf8))
            s.close()
            #expect(seen.value.last == original, "\(incoming) in, \(outgoing) out")

            // Strict: a client that sends no header is closed and counted; nothing reaches the upstream.
            let before = upstream.accepted.value
            let bare = try TestSocket.connect(gateway.address)
            bare.setReceiveTimeout(seconds: 10)
            bare.write(Array("GET / HTTP/1.1\r\n\r\n".utf8))
            #expect(bare.readOneByte() <= 0)
            bare.close()
            #expect(gateway.server.total(.proxyHeaderRejected) == 1)
            #expect(upstream.accepted.value == before)
        }
    }

    @Test("proxy_protocol_from: a header forged by a peer that is not a listed balancer is refused and counted; a balancer's is believed; the key is required")
    func forgedHeaders() throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let (port, adminPort) = (try unusedPort(), try unusedPort())
        func config(_ from: String) -> String {
            """
            listeners:
              - {name: lb, listen: "127.0.0.1:\(port)", mode: forward, upstream: "\(upstream.address)", accept_proxy_protocol: true\(from)}
              - {name: admin, listen: "127.0.0.1:\(adminPort)", mode: admin}
            """
        }
        let missing = try writeTemporaryFile(config(""))
        defer { unlink(missing) }
        let refused = try runCommand(productPath("igris"), ["check", "-c", missing])
        #expect(refused.status != 0 && refused.stderr.contains("listeners[0].accept_proxy_protocol: needs proxy_protocol_from"), "\(refused.stderr)")

        let path = try writeTemporaryFile(config(", proxy_protocol_from: [127.0.0.9/32]"))
        defer { unlink(path) }
        let child = try ChildProcess(productPath("igris"), ["serve", "-c", path])
        defer { child.terminate() }
        let log = LogLines(child)
        #expect(log.wait(for: "forwarding"))
        let header = ProxyProtocol.encode(.proxied(source: .init(address: [203, 0, 113, 7], port: 4000),
                                                   destination: .init(address: [127, 0, 0, 1], port: port)), version: .v1)
        func attempt(from source: String) throws -> Bool {
            let fd = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
            let s = TestSocket(fd: fd)
            defer { s.close() }
            try Syscall.bind(fd, try SocketAddress.resolve("\(source):0"))
            let target = try SocketAddress.resolve("127.0.0.1:\(port)")
            guard target.withSockAddr({ Glibc.connect(fd, $0, $1) }) == 0 else { return false }
            s.setReceiveTimeout(seconds: 10)
            _ = s.write(header + [42])
            return (try? s.readExactly(1)) == [42]
        }
        #expect(try !attempt(from: "127.0.0.1"), "a forged header from a client was believed")
        #expect(log.wait(for: "PROXY header from an untrusted peer refused"))
        #expect(log.lines.value.contains { $0.contains("untrusted peer") && $0.contains("peer=127.0.0.1:") })
        #expect(try attempt(from: "127.0.0.9"), "the balancer's header is refused")
        let admin = try SocketAddress.resolve("127.0.0.1:\(adminPort)")
        #expect((HandoffTests.metric(admin, "igris_proxy_header_rejected_total") ?? 0) >= 1, "counted")
        #expect(log.wait(for: "client=203.0.113.7:4000"), "the balancer's client is the one logged")
    }

    @Test("without accept_proxy_protocol nothing is parsed; send uses the real peer", arguments: engineBackends)
    func sendOnly(backend: BackendChoice) throws {
        let seen = SharedBox<[ProxyProtocol.Header]>([])
        let upstream = try Self.headerReadingUpstream(seen)
        defer { upstream.stop() }
        let gateway = try Gateway(backend: backend, upstream: upstream.address) { $0.listeners[0].sendProxyProtocol = .v2 }
        defer { gateway.stop() }
        let s = try TestSocket.connect(gateway.address)
        s.setReceiveTimeout(seconds: 10)
        let header = ProxyProtocol.encode(.local, version: .v1)
        s.write(header)  // a client's bytes that look like a header are just bytes
        #expect(try s.readExactly(header.count) == header)
        let local = try Syscall.localAddress(s.fd)
        s.close()
        guard case .proxied(let source, let destination) = seen.value.last else { Issue.record("no proxied header"); return }
        #expect(source.address == [127, 0, 0, 1] && source.port == local.port)
        #expect(destination.port == gateway.address.port)
    }

    @Test("interop with HAProxy: send-proxy-v2 into igris, igris's v2 into HAProxy accept-proxy; the upstream sees the client", arguments: engineBackends)
    func haproxyInterop(backend: BackendChoice) throws {
        // client (127.0.0.77) → HAProxy tcp frontend (send-proxy-v2) → igris (accept v2, send v2)
        //   → HAProxy http frontend (accept-proxy, option forwardfor) → upstream reads X-Forwarded-For.
        let forwardedFor = SharedBox<[String]>([])
        let upstream = try TestUpstream { socket in
            var head: [UInt8] = []
            while !(head.count >= 4 && Array(head.suffix(4)) == [13, 10, 13, 10]) {
                guard let b = try? socket.readExactly(1) else { socket.close(); return }
                head += b
            }
            let text = String(decoding: head, as: UTF8.self)
            let xff = text.split(separator: "\r\n").first { $0.lowercased().hasPrefix("x-forwarded-for:") }
            forwardedFor.update { $0.append(xff.map { String($0.dropFirst(16)).trimmingCharacters(in: .whitespaces) } ?? "") }
            socket.write(Array("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".utf8))
            socket.close()
        }
        defer { upstream.stop() }
        let inbound = try unusedPort()
        let httpPort = try unusedPort()
        let gateway = try Gateway(backend: backend, upstream: try SocketAddress.resolve("127.0.0.1:\(httpPort)")) {
            $0.listeners[0].sendProxyProtocol = .v2
            $0.listeners[0] = try! acceptingProxyHeaders($0.listeners[0])
        }
        defer { gateway.stop() }
        let config = try writeTemporaryFile("""
            global
                maxconn 100
            defaults
                timeout connect 5s
                timeout client 10s
                timeout server 10s
            frontend tcp_in
                mode tcp
                bind 127.0.0.1:\(inbound)
                default_backend to_igris
            backend to_igris
                mode tcp
                server igris \(gateway.address) send-proxy-v2
            frontend http_in
                mode http
                option forwardfor
                bind 127.0.0.1:\(httpPort) accept-proxy
                default_backend app
            backend app
                mode http
                server app \(upstream.address)

            """)
        defer { unlink(config) }
        let haproxy = try ChildProcess("/usr/sbin/haproxy", ["-f", config, "-db"])
        defer { haproxy.terminate() }
        if !waitUntilAccepting("127.0.0.1:\(httpPort)") {
            haproxy.signal(SIGTERM)
            Issue.record("haproxy did not start: \(haproxy.finish().stderr.replacingOccurrences(of: "\n", with: " | "))")
            return
        }

        // The client connects from 127.0.0.77 so its address is recognisable at the far end.
        let fd = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
        try Syscall.bind(fd, try SocketAddress.resolve("127.0.0.77:0"))
        let target = try SocketAddress.resolve("127.0.0.1:\(inbound)")
        #expect(target.withSockAddr { Glibc.connect(fd, $0, $1) } == 0)
        let client = TestSocket(fd: fd)
        client.setReceiveTimeout(seconds: 10)
        client.write(Array("GET / HTTP/1.1\r\nHost: app\r\n\r\n".utf8))
        let response = try readHTTPResponse(client)
        client.close()
        #expect(response.hasPrefix("HTTP/1.1 200"), "\(response)")
        #expect(forwardedFor.value == ["127.0.0.77"])
    }
}
