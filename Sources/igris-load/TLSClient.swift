import ArgumentParser
import Glibc
import IgrisEngine
import IgrisTLS

/// `--tls`: a client connection speaks TLS to what it dials (a TLS forward, or a SOCKS5 /
/// HTTPS proxy's TLS listener), through IgrisTLS on a blocking socket. One thread uses a
/// connection at a time (`bulk --duplex` has two, so it refuses `--tls`).
struct TLSOptions: ParsableArguments {
    @Flag(help: "Speak TLS to the dialled address.") var tls = false
    @Option(name: .customLong("tls-ca"), help: "--tls: verify the server against this CA bundle (PEM); default: no verification.")
    var ca: String?
    @Option(name: .customLong("tls-name"), help: "--tls: the SNI name (and the name verified).") var name: String = "localhost"
    @Flag(name: .customLong("tls-no-resume"), help: "--tls: full handshakes only (no session tickets).") var noResume = false

    func context() throws -> TLSClientContext? {
        guard tls else { return nil }
        var settings = TLSClientSettings()
        settings.verify = ca != nil
        settings.ca = ca
        settings.serverName = name
        settings.resumeSessions = !noResume
        do { return try TLSClientContext(settings) } catch { throw ValidationError(error.description) }
    }
}

/// A TLS session over a connected blocking socket.
final class TLSConnection: @unchecked Sendable {
    let fd: Int32
    let session: TLSSession
    private let buffer = UnsafeMutableRawPointer.allocate(byteCount: 64 * 1024, alignment: 64)

    init(fd: Int32, context: TLSClientContext) throws {
        self.fd = fd
        guard let session = context.makeSession(host: "") else { throw ProxyError("TLS: no session") }
        self.session = session
        var step = session.handshake()
        while true {
            guard flush() else { throw ProxyError("TLS handshake: send failed") }
            switch step {
            case .done: return
            case .failed(let f): throw ProxyError("TLS handshake: \(f)")
            case .wantInput:
                let n = Syscall.recv(fd, buffer, 64 * 1024)
                guard n > 0 else { throw ProxyError("TLS handshake: the server closed") }
                session.feed(buffer, count: n)
                step = session.handshake()
            }
        }
    }

    deinit { buffer.deallocate() }

    var resumed: Bool { session.resumed }

    private func flush() -> Bool {
        while session.pendingOutput > 0 {
            let n = session.takeOutput(into: buffer, capacity: 64 * 1024)
            var off = 0
            while off < n {
                let k = Syscall.send(fd, buffer + off, n - off)
                if k <= 0 { return false }
                off += k
            }
        }
        return true
    }

    func writeAll(_ p: UnsafeRawPointer, _ count: Int) -> Bool {
        session.write(p, count: count) && flush()
    }

    func readExactly(_ p: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        var off = 0
        while off < count {
            switch session.read(into: p + off, capacity: count - off) {
            case .bytes(let n): off += n
            case .wantInput:
                let n = Syscall.recv(fd, buffer, 64 * 1024)
                if n <= 0 { return false }
                session.feed(buffer, count: n)
            case .closed, .failed: return false
            }
        }
        return true
    }

    /// close_notify, then the socket's write side.
    func finish() {
        session.shutdown()
        _ = flush()
    }
}
