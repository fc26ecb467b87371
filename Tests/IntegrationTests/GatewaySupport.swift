import Foundation
import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisPolicy
import IgrisProtocols

/// An in-process gateway with one SOCKS5 and one HTTP CONNECT listener on free loopback ports.
final class ProxyGateway: @unchecked Sendable {
    let server: Server
    let gateway: IgrisNegotiation.Gateway
    var policy: GatewayPolicy { gateway.policy }
    var socks5: SocketAddress { server.listenAddresses[0] }
    var http: SocketAddress { server.listenAddresses[1] }

    init(backend: BackendChoice, auth: Bool = false, allow: [String] = [], users: UserDirectory? = nil,
         handshakeTimeout: UInt64 = 10_000_000_000, configure: (inout ServerConfiguration) -> Void = { _ in }) throws {
        let options = GatewayOptions(requireAuthentication: auth, handshakeTimeoutNanoseconds: handshakeTimeout)
        let rules = try allow.map { try DestinationACL.parseRule(.allow, $0).get() }
        gateway = IgrisNegotiation.Gateway(policy: GatewayPolicy(acl: DestinationACL(rules: rules),
                                                                 authenticator: try users.map { try Authenticator(directory: $0) }))
        var configuration = ServerConfiguration(listeners: [
            try gateway.rule(listen: try SocketAddress.resolve("127.0.0.1:0"), name: "socks", mode: .socks5, options: options),
            try gateway.rule(listen: try SocketAddress.resolve("127.0.0.1:0"), name: "http", mode: .httpConnect, options: options),
        ], workers: 2, backend: backend)
        configuration.accounts = gateway.policy.accounts
        configure(&configuration)
        server = try Server(configuration: configuration)
        try server.start()
    }

    func stop() {
        server.beginDrain()
        server.wait()
        gateway.shutdown()
    }

    func total(_ counter: WorkerStatistics.Counter) -> Int64 { server.total(counter) }

    func eventually(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
        IntegrationTests.eventually(seconds: seconds, condition)
    }
}

/// The client side of a SOCKS5 handshake over a blocking test socket.
enum Socks5Client {
    /// Greeting (+ RFC 1929 when `credentials`) + CONNECT; returns the socket and the reply
    /// code (the socket is ready for tunnel bytes when it is 0).
    static func connect(_ proxy: SocketAddress, to destination: Socks5.Address, port: UInt16,
                        credentials: (String, String)? = nil, from source: SocketAddress? = nil) throws -> (TestSocket, UInt8) {
        let s = try TestSocket.connect(proxy, from: source)
        s.setReceiveTimeout(seconds: 10)
        s.write(credentials == nil ? [5, 1, 0] : [5, 1, 2])
        let method = try s.readExactly(2)
        guard method[0] == 5, method[1] != 0xFF else { throw TestFailure("no acceptable method: \(method)") }
        if let (user, password) = credentials {
            s.write([1, UInt8(user.utf8.count)] + Array(user.utf8) + [UInt8(password.utf8.count)] + Array(password.utf8))
            let status = try s.readExactly(2)
            guard status == [1, 0] else { throw TestFailure("authentication refused: \(status)") }
        }
        s.write(request(destination, port: port))
        return (s, try readReply(s))
    }

    static func request(_ destination: Socks5.Address, port: UInt16) -> [UInt8] {
        var bytes: [UInt8] = [5, 1, 0]
        switch destination {
        case let .ipv4(a, b, c, d): bytes += [1, a, b, c, d]
        case .ipv6(let v): bytes += [4] + v
        case .domain(let name): bytes += [3, UInt8(name.utf8.count)] + Array(name.utf8)
        }
        return bytes + [UInt8(port >> 8), UInt8(port & 0xFF)]
    }

    /// Reads a whole reply (its length depends on the bound address type); returns REP.
    static func readReply(_ s: TestSocket) throws -> UInt8 {
        let head = try s.readExactly(4)
        guard head[0] == 5 else { throw TestFailure("not a SOCKS5 reply: \(head)") }
        switch head[3] {
        case 1: _ = try s.readExactly(6)
        case 4: _ = try s.readExactly(18)
        case 3: _ = try s.readExactly(Int(try s.readExactly(1)[0]) + 2)
        default: throw TestFailure("bad bound address type \(head[3])")
        }
        return head[1]
    }
}

/// `python3 -m http.server` on a free loopback port, serving one file of random bytes.
final class FileServer: @unchecked Sendable {
    let directory: String
    let port: UInt16
    let digest: [UInt8]
    let size: Int
    private let child: ChildProcess

    init(size: Int = 3 << 20) throws {
        directory = NSTemporaryDirectory() + "igris-www-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var bytes = [UInt8](repeating: 0, count: size)
        var pattern = PatternStream(seed: UInt64(size))
        bytes.withUnsafeMutableBytes { pattern.fill($0) }
        try Data(bytes).write(to: URL(fileURLWithPath: directory + "/blob"))
        self.size = size
        digest = sha256(bytes)
        port = try unusedPort()
        // -u: unbuffered, so its "Serving HTTP" line (printed once bound) is the ready signal.
        child = try ChildProcess("/usr/bin/python3", ["-u", "-m", "http.server", "\(port)", "--bind", "127.0.0.1", "--directory", directory])
        let line = child.readLine()
        guard line.contains("Serving HTTP") else { throw TestFailure("http.server did not start: \(line)") }
    }

    func stop() {
        child.terminate()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

func sha256(_ bytes: [UInt8]) -> [UInt8] {
    var h = SHA256()
    bytes.withUnsafeBytes { h.update($0) }
    return h.finish()
}

/// Runs curl, writing the body to a temporary file; returns curl's exit status, its stderr
/// and the body's SHA-256.
func curl(_ arguments: [String]) throws -> (status: Int32, stderr: String, digest: [UInt8]?) {
    let out = NSTemporaryDirectory() + "igris-curl-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    defer { try? FileManager.default.removeItem(atPath: out) }
    let (status, stderr) = try runCommand("/usr/bin/curl", ["-sS", "--max-time", "20", "-o", out] + arguments, timeout: 30)
    let body = FileManager.default.contents(atPath: out).map { sha256(Array($0)) }
    return (status, stderr, body)
}

func writeTemporaryFile(_ text: String) throws -> String {
    let path = NSTemporaryDirectory() + "igris-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).yaml"
    try text.write(toFile: path, atomically: true, encoding: .utf8)
    chmod(path, 0o600)  // whatever the umask: igris refuses a group- or world-writable users file
    return path
}

/// Runs `command` with /bin/sh; returns exit status, stdout and stderr.
func runShell(_ command: String) throws -> (Int32, String, String) {
    let child = try ChildProcess("/bin/sh", ["-c", command])
    let out = String(decoding: child.stdout.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    let (status, err) = child.finish()
    return (status, out, err)
}

/// A forward listener behind a balancer: its connections must start with a PROXY header.
func acceptingProxyHeaders(_ rule: ListenerRule, handshakeTimeout: UInt64 = 10_000_000_000) throws -> ListenerRule {
    var accepting = try proxyHeaderGateway.rule(listen: rule.listen, name: rule.name, mode: .forward, pool: rule.pool,
                                                options: GatewayOptions(requireAuthentication: false, handshakeTimeoutNanoseconds: handshakeTimeout),
                                                acceptProxyProtocol: true)
    accepting.sendProxyProtocol = rule.sendProxyProtocol
    return accepting
}

/// Negotiation threads for PROXY-accepting test listeners (no users, default ACL).
let proxyHeaderGateway = IgrisNegotiation.Gateway(policy: GatewayPolicy(), offloadThreads: 1)
