import Testing
@testable import IgrisProtocols

@Suite("PROXY protocol codec")
struct ProxyProtocolTests {
    static let v4 = ProxyProtocol.Header.proxied(source: .init(address: [203, 0, 113, 7], port: 51234),
                                                 destination: .init(address: [192, 0, 2, 1], port: 443))
    static let v6 = ProxyProtocol.Header.proxied(source: .init(address: [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [7], port: 1),
                                                 destination: .init(address: [UInt8](repeating: 0, count: 15) + [1], port: 65535))

    static func parse(_ bytes: [UInt8], chunk: Int) -> (ProxyProtocol.Parser.Event, Int) {
        var parser = ProxyProtocol.Parser()
        var offset = 0
        while offset < bytes.count {
            let end = min(bytes.count, offset + chunk)
            let (n, event) = bytes[offset..<end].withUnsafeBytes { parser.feed($0) }
            offset += n
            if event != .needMore { return (event, offset) }
        }
        return (.needMore, offset)
    }

    @Test("v1 and v2 round trip for IPv4, IPv6 and LOCAL, split at every byte; payload is left", arguments: [1, 3, 1000])
    func roundTrip(chunk: Int) {
        for header in [Self.v4, Self.v6, .local] {
            for version in [ProxyProtocol.Version.v1, .v2] {
                let encoded = ProxyProtocol.encode(header, version: version)
                let (event, consumed) = Self.parse(encoded + Array("payload".utf8), chunk: chunk)
                #expect(event == .header(header), "\(version) \(header)")
                #expect(consumed == encoded.count)
            }
        }
    }

    @Test("v1 text is what HAProxy sends")
    func v1Text() {
        #expect(String(decoding: ProxyProtocol.encode(Self.v4, version: .v1), as: UTF8.self) == "PROXY TCP4 203.0.113.7 192.0.2.1 51234 443\r\n")
        #expect(String(decoding: ProxyProtocol.encode(.local, version: .v1), as: UTF8.self) == "PROXY UNKNOWN\r\n")
        let v2 = ProxyProtocol.encode(Self.v4, version: .v2)
        #expect(v2.count == 28 && v2[12] == 0x21 && v2[13] == 0x11 && v2[15] == 12)
    }

    @Test("a missing or malformed header is refused, never waited on past its limit")
    func failures() {
        let cases: [([UInt8], ProxyProtocol.Failure)] = [
            (Array("GET / HTTP/1.1\r\n\r\n".utf8), .missing),
            ([5, 1, 0], .missing),
            (Array("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".utf8), .malformed("v1 header must end in CRLF")),
            (Array("PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n".utf8), .malformed("v1 header with a bad address or port")),
            (Array("PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n".utf8), .malformed("v1 header with a bad address or port")),
            (Array("PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".utf8), .malformed("v1 header is not PROXY TCP4|TCP6 SRC DST SPORT DPORT")),
            (Array("PROXY TCP4 ".utf8) + [UInt8](repeating: 0x31, count: 120), .malformed("v1 header longer than 107 bytes")),
            (ProxyProtocol.v2Signature + [0x11, 0x11, 0, 12], .malformed("v2 header with version 1")),
            (ProxyProtocol.v2Signature + [0x22, 0x11, 0, 12], .malformed("v2 header with command 2")),
            (ProxyProtocol.v2Signature + [0x21, 0x11, 0xFF, 0xFF], .malformed("v2 header longer than 1040 bytes")),
            (ProxyProtocol.v2Signature + [0x21, 0x11, 0, 4, 1, 2, 3, 4], .malformed("v2 IPv4 addresses truncated")),
            (ProxyProtocol.v2Signature + [0x21, 0x12, 0, 12] + [UInt8](repeating: 0, count: 12), .malformed("v2 header for a family/transport other than TCP over IPv4/IPv6")),
        ]
        for (bytes, failure) in cases {
            #expect(Self.parse(bytes, chunk: 1).0 == .failure(failure), "\(bytes.prefix(20))")
        }
    }

    @Test("v2 TLVs after the addresses are skipped")
    func tlvs() {
        var bytes = ProxyProtocol.encode(Self.v4, version: .v2)
        bytes[15] = 12 + 7
        bytes += [0x01, 0, 4] + Array("h2h2".utf8)  // PP2_TYPE_ALPN
        let (event, consumed) = Self.parse(bytes + [0xAA], chunk: 5)
        #expect(event == .header(Self.v4))
        #expect(consumed == bytes.count)
    }
}
