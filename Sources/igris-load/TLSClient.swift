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

/// A client connection's TLS: IgrisTLS's blocking stream, with the load modes' calls.
final class TLSConnection: @unchecked Sendable {
    let stream: BlockingTLSStream

    init(fd: Int32, context: TLSClientContext) throws {
        guard let session = context.makeSession(host: "") else { throw ProxyError("TLS: no session") }
        do { stream = try BlockingTLSStream(fd: fd, session: session) } catch { throw ProxyError("TLS handshake: \(error)") }
    }

    var resumed: Bool { stream.session.resumed }

    func writeAll(_ p: UnsafeRawPointer, _ count: Int) -> Bool { stream.write(p, count: count) }

    func readExactly(_ p: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        var off = 0
        while off < count {
            let n = stream.read(into: p + off, capacity: count - off)
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    /// close_notify, then the socket's write side.
    func finish() { stream.finish() }
}
