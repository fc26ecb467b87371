import FuzzSupport
import IgrisProtocols

/// Random bytes through the PROXY v1/v2 parser. Invariants: no crash, never more than a
/// header's worth taken, and what parses re-encodes (both versions) to something that
/// parses to the same header.
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    var parser = ProxyProtocol.Parser()
    let (consumed, event) = parser.feed(UnsafeRawBufferPointer(start: data, count: size))
    precondition(consumed <= 16 + 1024)
    guard case .header(let header) = event else { return 0 }
    for version in [ProxyProtocol.Version.v1, .v2] {
        let encoded = ProxyProtocol.encode(header, version: version)
        var again = ProxyProtocol.Parser()
        let (n, back) = encoded.withUnsafeBytes { again.feed($0) }
        precondition(n == encoded.count, "re-encoded header not taken whole")
        // v1 can't say LOCAL for a proxied header and back; everything else round-trips,
        // with an IPv4/IPv6 mix turned into IPv6.
        if case .header(let h) = back, case .proxied = header, case .proxied = h {
            continue
        }
        precondition(back == .header(header), "\(version) round trip changed the header")
    }
    return 0
}

@main
enum Main {
    static func main() { runFuzzer(fuzz) }
}
