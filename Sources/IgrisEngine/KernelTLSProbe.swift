import Glibc
import CLinux

/// Whether this kernel could take TLS records over (kTLS): the `tls` upper-layer protocol on
/// an established TCP socket. IGRIS runs TLS in user space either way; `igris probe`
/// reports this so an operator knows what the kernel offers (Kernel-notes: what it needs).
public enum KernelTLSProbe {
    public struct Result: Sendable {
        public var available: Bool
        public var reason: String
    }

    /// Tries `setsockopt(TCP_ULP, "tls")` on a loopback connection made for the purpose.
    public static func run() -> Result {
        guard let listener = try? Syscall.streamSocket(family: AF_INET, nonBlocking: false) else { return Result(available: false, reason: "no socket") }
        defer { Glibc.close(listener) }
        guard let any = try? SocketAddress.resolve("127.0.0.1:0"), (try? Syscall.bind(listener, any)) != nil,
              (try? Syscall.listen(listener, backlog: 1)) != nil, let bound = try? Syscall.localAddress(listener),
              let client = try? Syscall.streamSocket(family: AF_INET, nonBlocking: false) else {
            return Result(available: false, reason: "no loopback connection to try it on")
        }
        defer { Glibc.close(client) }
        guard bound.withSockAddr({ Glibc.connect(client, $0, $1) }) == 0 else { return Result(available: false, reason: "loopback connect failed") }
        let server = Syscall.accept(listener, nonBlocking: false)
        if server >= 0 { Glibc.close(server) }
        let ulp = Array("tls".utf8)
        let tcpULP: Int32 = 31  // TCP_ULP (linux/tcp.h)
        if setsockopt(client, Int32(IPPROTO_TCP), tcpULP, ulp, socklen_t(ulp.count)) == 0 {
            return Result(available: true, reason: "the tls ULP attaches (TLS_TX/TLS_RX possible)")
        }
        let e = igris_errno()
        switch e {
        case ENOENT: return Result(available: false, reason: "TCP_ULP \"tls\": ENOENT: this kernel has no tls module (CONFIG_TLS; modprobe tls)")
        case ENOPROTOOPT: return Result(available: false, reason: "TCP_ULP: ENOPROTOOPT: kernel older than 4.13")
        default: return Result(available: false, reason: "TCP_ULP \"tls\": \(Errno.describe(e))")
        }
    }
}
