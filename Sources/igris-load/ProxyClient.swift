import ArgumentParser
import Glibc
import IgrisEngine
import IgrisPolicy
import IgrisProtocols
import IgrisTLS

/// `--socks5 HOST:PORT [--socks-user U:P]` or `--http-proxy HOST:PORT`: every client
/// connection goes through that proxy to `--connect` (sent as given: an IP literal, or a
/// name the proxy resolves).
struct ProxyOptions: ParsableArguments {
    @Option(name: .customLong("socks5"), help: "Reach --connect through this SOCKS5 proxy, HOST:PORT.")
    var socks5: String?

    @Option(name: .customLong("socks-user"), help: "SOCKS5 username:password (RFC 1929).")
    var socksUser: String?

    @Option(name: .customLong("http-proxy"), help: "Reach --connect through this HTTP CONNECT proxy, HOST:PORT.")
    var httpProxy: String?

    @OptionGroup var tls: TLSOptions

    func validate() throws {
        if socks5 != nil && httpProxy != nil { throw ValidationError("--socks5 and --http-proxy: choose one") }
        if socksUser != nil && socks5 == nil { throw ValidationError("--socks-user needs --socks5") }
        if let u = socksUser, !u.contains(":") { throw ValidationError("--socks-user is USER:PASSWORD") }
    }

    /// Resolves what to dial and how to get from there to `target`.
    func route(to target: String) throws -> ConnectRoute {
        if let socks5 {
            let (host, port) = try splitTarget(target)
            var credentials: ([UInt8], [UInt8])? = nil
            if let u = socksUser, let colon = u.firstIndex(of: ":") {
                credentials = (Array(u[..<colon].utf8), Array(u[u.index(after: colon)...].utf8))
            }
            return ConnectRoute(dial: try resolveTarget(socks5), handshake: .socks5(host: host, port: port, credentials: credentials), tls: try tls.context())
        }
        if let httpProxy {
            _ = try splitTarget(target)
            return ConnectRoute(dial: try resolveTarget(httpProxy), handshake: .httpConnect(authority: target), tls: try tls.context())
        }
        return ConnectRoute(dial: try resolveTarget(target), handshake: .none, tls: try tls.context())
    }

    private func splitTarget(_ target: String) throws -> (String, UInt16) {
        do { return try SocketAddress.split(target) } catch { throw ValidationError(error.description) }
    }
}

struct ConnectRoute: Sendable {
    enum Handshake: Sendable {
        case none
        case socks5(host: String, port: UInt16, credentials: ([UInt8], [UInt8])?)
        case httpConnect(authority: String)
    }

    var dial: SocketAddress
    var handshake: Handshake
    /// `--tls`: the dialled address speaks TLS (the proxy's handshake goes inside it).
    var tls: TLSClientContext? = nil

    /// A connected socket, through the proxy when there is one. With `sourceIndex`, a
    /// loopback target is dialled from 127.0.0.(1 + index % 250), spreading many connections
    /// over many source addresses so they never run out of ephemeral ports.
    func open(sourceIndex: Int? = nil) throws -> ClientSocket {
        var source: SocketAddress? = nil
        if let i = sourceIndex, dial.family == AF_INET, dial.ipAddress.description.hasPrefix("127.") {
            source = SocketAddress(ip: IPAddress(ipv4: 127, 0, 0, UInt8(1 + i % 250)), port: 0)
        }
        var s = try ClientSocket(dial, source: source)
        do {
            if let tls { s.tls = try TLSConnection(fd: s.fd, context: tls) }
            try negotiate(s)
        } catch {
            s.close()
            throw error
        }
        return s
    }

    private func negotiate(_ s: ClientSocket) throws {
        switch handshake {
        case .none:
            return
        case .socks5(let host, let port, let credentials):
            var greeting: [UInt8] = [5, 1, credentials == nil ? 0 : 2]
            guard s.writeAll(&greeting, 3) else { throw ProxyError("SOCKS5 greeting not sent") }
            var method: [UInt8] = [0, 0]
            guard s.readExactly(&method, 2), method[0] == 5, method[1] != 0xFF else {
                throw ProxyError("SOCKS5 proxy accepted no authentication method")
            }
            if let (user, password) = credentials {
                var auth: [UInt8] = [1, UInt8(user.count)] + user + [UInt8(password.count)] + password
                var status: [UInt8] = [0, 0]
                guard s.writeAll(&auth, auth.count), s.readExactly(&status, 2), status[1] == 0 else {
                    throw ProxyError("SOCKS5 authentication failed")
                }
            }
            var request: [UInt8] = [5, 1, 0]
            if let v4 = parseIPv4(host) {
                request += [1] + v4
            } else if host.contains(":"), let v6 = parseIPv6(host) {
                request += [4] + v6
            } else {
                request += [3, UInt8(host.utf8.count)] + Array(host.utf8)
            }
            request += [UInt8(port >> 8), UInt8(port & 0xFF)]
            guard s.writeAll(&request, request.count) else { throw ProxyError("SOCKS5 request not sent") }
            var head: [UInt8] = [0, 0, 0, 0]
            guard s.readExactly(&head, 4), head[0] == 5 else { throw ProxyError("no SOCKS5 reply") }
            let rest = head[3] == 1 ? 6 : head[3] == 4 ? 18 : -1
            guard rest > 0 else { throw ProxyError("SOCKS5 reply with bound address type \(head[3])") }
            var bound = [UInt8](repeating: 0, count: rest)
            guard s.readExactly(&bound, rest) else { throw ProxyError("truncated SOCKS5 reply") }
            guard head[1] == 0 else { throw ProxyError("SOCKS5 proxy replied \(head[1]) (\(Socks5.Reply(rawValue: head[1]).map { "\($0)" } ?? "?"))") }
        case .httpConnect(let authority):
            var request = Array("CONNECT \(authority) HTTP/1.1\r\nHost: \(authority)\r\n\r\n".utf8)
            guard s.writeAll(&request, request.count) else { throw ProxyError("CONNECT not sent") }
            // Read the response head byte by byte: nothing past it may be consumed.
            var head: [UInt8] = []
            var byte: UInt8 = 0
            while !(head.count >= 4 && head[head.count - 4] == 13 && head[head.count - 3] == 10 && head[head.count - 2] == 13 && head[head.count - 1] == 10) {
                guard head.count < 16384, s.readExactly(&byte, 1) else { throw ProxyError("no CONNECT response") }
                head.append(byte)
            }
            let status = String(decoding: head.prefix(12), as: UTF8.self)
            guard status.hasPrefix("HTTP/1.1 200") || status.hasPrefix("HTTP/1.0 200") else {
                throw ProxyError("CONNECT refused: \(String(decoding: head.prefix { $0 != 13 }, as: UTF8.self))")
            }
        }
    }

    private func parseIPv4(_ s: String) -> [UInt8]? {
        let parts = s.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4 else { return nil }
        var out: [UInt8] = []
        for p in parts { guard let v = UInt8(p) else { return nil }; out.append(v) }
        return out
    }

    private func parseIPv6(_ s: String) -> [UInt8]? {
        var storage = in6_addr()
        guard inet_pton(AF_INET6, s, &storage) == 1 else { return nil }
        return withUnsafeBytes(of: storage) { Array($0) }
    }
}

struct ProxyError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
