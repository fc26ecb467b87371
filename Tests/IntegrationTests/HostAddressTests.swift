import Foundation
import Glibc
import Testing

/// The default ACL denies this host's own addresses: in a network namespace whose only
/// address besides loopback is an ordinary public-looking one (on its lo, so nothing leaves
/// the namespace), a SOCKS5 client can't reach a server bound to 0.0.0.0 there, nor
/// igris's own admin endpoint, unless an --allow rule says so.
@Suite("Host addresses in the default ACL", .serialized)
struct HostAddressTests {
    static let namespace = "igris-hostacl-\(getpid())"
    static let address = "1.2.3.4"

    @Test("a SOCKS5 client is refused the host's own address (a web server on 0.0.0.0 and the admin endpoint); --allow reaches it",
          .enabled(if: DeadPeerTests.canCreateNamespaces, "network namespaces need root and iproute2's ip"))
    func hostAddressDenied() throws {
        try DeadPeerTests.ip(["netns", "add", Self.namespace])
        defer { _ = try? runCommand("/usr/sbin/ip", ["netns", "del", Self.namespace]) }
        for args in [["link", "set", "lo", "up"], ["addr", "add", "\(Self.address)/32", "dev", "lo"]] {
            try DeadPeerTests.ip(["-n", Self.namespace] + args)
        }
        func inside(_ arguments: [String]) throws -> ChildProcess {
            try ChildProcess("/usr/sbin/ip", ["netns", "exec", Self.namespace] + arguments)
        }
        let web = try inside(["python3", "-m", "http.server", "25081", "--bind", "0.0.0.0"])
        defer { web.terminate() }
        func fetch(_ url: String) throws -> Int32 {
            try runCommand("/usr/sbin/ip", ["netns", "exec", Self.namespace, "curl", "-sS", "-o", "/dev/null", "--max-time", "5",
                                            "--socks5", "127.0.0.1:25100", url]).status
        }
        func gateway(_ extra: [String]) throws -> (ChildProcess, LogLines) {
            let child = try inside([productPath("igris"), "serve", "--socks5", "127.0.0.1:25100", "--no-auth",
                                    "--admin", "0.0.0.0:25190", "--workers", "1"] + extra)
            let log = LogLines(child)
            #expect(log.wait(for: "mode=socks5"))
            return (child, log)
        }

        // With an explicit allow, the address answers: the server is up and reachable.
        let (allowing, _) = try gateway(["--allow", "\(Self.address)/32"])
        #expect(eventually { (try? fetch("http://\(Self.address):25081/")) == 0 }, "the web server is reachable when allowed")
        allowing.signal(SIGTERM)
        _ = allowing.finish()

        // By default: refused (curl 97: the SOCKS5 reply said no), and so is the admin endpoint.
        let (denying, _) = try gateway([])
        defer { denying.terminate() }
        #expect(try fetch("http://\(Self.address):25081/") == 97)
        #expect(try fetch("http://\(Self.address):25190/metrics") == 97)
        #expect(try fetch("http://\(Self.address):25081/") == 97, "a second try as well")
        denying.signal(SIGTERM)
        #expect(denying.finish().status == 0)
    }
}
