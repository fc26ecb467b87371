import Foundation
import Glibc
import IgrisEngine
import Testing

/// Clients that vanish without FIN or RST — a phone leaving coverage, a NAT dropping its
/// mapping — must not stay bridged for ever. Here the clients live in a network namespace
/// whose veth link is deleted under them.
@Suite("Dead peers", .serialized)
struct DeadPeerTests {
    static let namespace = "igris-deadpeer-\(getpid())"
    static let hostSide = "igdp\(getpid() % 100_000)a"
    static let peerSide = "igdp\(getpid() % 100_000)b"
    static let hostAddress = "198.18.77.1"
    static let peerAddress = "198.18.77.2"

    static var canCreateNamespaces: Bool { geteuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") }

    @Test("bridges to clients behind a deleted veth close within dead_peer_timeout; a live idle one stays",
          .enabled(if: canCreateNamespaces, "network namespaces need root and iproute2's ip"), arguments: engineBackends)
    func vanishedClientsAreClosed(backend: BackendChoice) throws {
        try Self.ip(["netns", "add", Self.namespace])
        defer { _ = try? runCommand("/usr/sbin/ip", ["netns", "del", Self.namespace]) }
        try Self.ip(["link", "add", Self.hostSide, "type", "veth", "peer", "name", Self.peerSide])
        defer { _ = try? runCommand("/usr/sbin/ip", ["link", "del", Self.hostSide]) }
        try Self.ip(["link", "set", Self.peerSide, "netns", Self.namespace])
        try Self.ip(["addr", "add", "\(Self.hostAddress)/30", "dev", Self.hostSide])
        try Self.ip(["link", "set", Self.hostSide, "up"])
        try Self.ip(["netns", "exec", Self.namespace, "ip", "addr", "add", "\(Self.peerAddress)/30", "dev", Self.peerSide])
        try Self.ip(["netns", "exec", Self.namespace, "ip", "link", "set", Self.peerSide, "up"])

        let upstream = try echoUpstream()
        defer { upstream.stop() }
        var configuration = ServerConfiguration(forwards: [
            ForwardRule(listen: try SocketAddress.resolve("\(Self.hostAddress):0"), upstream: upstream.address),
            ForwardRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: upstream.address),
        ], workers: 2, backend: backend)
        configuration.deadPeerTimeoutNanoseconds = 2_000_000_000
        let server = try Server(configuration: configuration)
        try server.start()
        defer { server.beginDrain(); server.wait() }

        // A live idle client on loopback: it answers keepalive probes and must stay.
        let live = try TestSocket.connect(server.listenAddresses[1])
        defer { live.close() }
        live.setReceiveTimeout(seconds: 10)
        live.write([7])
        #expect(try live.readExactly(1) == [7])

        // 20 clients in the namespace, each verified by an echo, then held idle.
        let holder = try ChildProcess("/usr/sbin/ip", ["netns", "exec", Self.namespace, productPath("igris-load"), "hold",
                                                     "--connect", "\(server.listenAddresses[0])", "--connections", "20", "--hold", "60"])
        defer { holder.terminate() }
        #expect(eventually(seconds: 15) { server.total(.activeConnections) == 21 }, "all 20 bridged")

        // The link goes away: no FIN, no RST ever reaches the gateway.
        let cut = Date()
        try Self.ip(["link", "del", Self.hostSide])
        #expect(eventually(seconds: 30) { server.total(.activeConnections) == 1 }, "the 20 dead bridges closed")
        print("dead peers closed \(String(format: "%.1f", Date().timeIntervalSince(cut))) s after the link went (dead_peer_timeout 2 s)")
        #expect(server.total(.deadPeers) == 20)
        live.write([8])
        #expect(try live.readExactly(1) == [8], "the live idle client is untouched")
    }

    static func ip(_ arguments: [String]) throws {
        let (status, stderr) = try runCommand("/usr/sbin/ip", arguments)
        guard status == 0 else { throw TestFailure("ip \(arguments.joined(separator: " ")): \(stderr)") }
    }
}
