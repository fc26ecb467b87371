/// The PROXY protocol (HAProxy, versions 1 and 2): the header a load balancer puts in front
/// of a connection's bytes to say whom it came from. Encoding for upstreams, and an
/// incremental, bounded parser for listeners that accept it.
public enum ProxyProtocol {
    /// An endpoint: 4 (IPv4) or 16 (IPv6) address bytes in network order, and a port.
    public struct Endpoint: Equatable, Sendable {
        public var address: [UInt8]
        public var port: UInt16

        public init(address: [UInt8], port: UInt16) {
            precondition(address.count == 4 || address.count == 16)
            self.address = address
            self.port = port
        }

        var isIPv4: Bool { address.count == 4 }

        var text: String {
            if isIPv4 { return address.map(String.init).joined(separator: ".") }
            var groups: [String] = []
            for i in stride(from: 0, to: 16, by: 2) {
                groups.append(String(UInt16(address[i]) << 8 | UInt16(address[i + 1]), radix: 16))
            }
            return groups.joined(separator: ":")
        }
    }

    public enum Header: Equatable, Sendable {
        /// A proxied connection: who connected to the balancer, and where.
        case proxied(source: Endpoint, destination: Endpoint)
        /// v2 LOCAL (health checks from the balancer itself) or v1 UNKNOWN: use the real peer.
        case local
    }

    public enum Version: String, Sendable {
        case v1
        case v2
    }

    static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    static let v1Prefix: [UInt8] = Array("PROXY ".utf8)
    /// v1: at most 107 bytes including CRLF (the spec's limit).
    static let v1MaxLength = 107
    /// v2: 16 fixed bytes plus addresses and TLVs; more than this is not a header we accept.
    static let v2MaxLength = 16 + 1024

    /// The header for `version`. Mixed families (IPv4 source, IPv6 destination) are sent as
    /// IPv6 with the IPv4 address mapped.
    public static func encode(_ header: Header, version: Version) -> [UInt8] {
        switch (header, version) {
        case (.local, .v1):
            return Array("PROXY UNKNOWN\r\n".utf8)
        case (.local, .v2):
            return v2Signature + [0x20, 0x00, 0x00, 0x00]
        case (.proxied(var source, var destination), .v1):
            if source.isIPv4 != destination.isIPv4 { (source, destination) = (mapped(source), mapped(destination)) }
            let family = source.isIPv4 ? "TCP4" : "TCP6"
            return Array("PROXY \(family) \(source.text) \(destination.text) \(source.port) \(destination.port)\r\n".utf8)
        case (.proxied(var source, var destination), .v2):
            if source.isIPv4 != destination.isIPv4 { (source, destination) = (mapped(source), mapped(destination)) }
            let length = source.isIPv4 ? 12 : 36
            var out = v2Signature + [0x21, source.isIPv4 ? 0x11 : 0x21, UInt8(length >> 8), UInt8(length & 0xFF)]
            out += source.address + destination.address
            out += [UInt8(source.port >> 8), UInt8(source.port & 0xFF), UInt8(destination.port >> 8), UInt8(destination.port & 0xFF)]
            return out
        }
    }

    static func mapped(_ e: Endpoint) -> Endpoint {
        guard e.isIPv4 else { return e }
        return Endpoint(address: [UInt8](repeating: 0, count: 10) + [0xFF, 0xFF] + e.address, port: e.port)
    }

    public enum Failure: Error, Equatable, Sendable {
        /// The connection does not start with a PROXY header (strict listeners close it).
        case missing
        case malformed(String)
    }

    /// Reads one header from the start of a connection, fed bytes as they arrive; takes no
    /// byte past the header.
    public struct Parser: Sendable {
        public enum Event: Equatable, Sendable {
            case needMore
            case header(Header)
            case failure(Failure)
        }

        private var pending: [UInt8] = []

        public init() {}

        public mutating func feed(_ bytes: UnsafeRawBufferPointer) -> (consumed: Int, event: Event) {
            var i = 0
            while i < bytes.count {
                pending.append(bytes[i])
                i += 1
                switch check() {
                case .needMore: continue
                case let e: return (i, e)
                }
            }
            return (i, .needMore)
        }

        private func check() -> Event {
            let n = pending.count
            // Which version: decided by the first bytes, and wrong as soon as they differ.
            let v2 = pending[0] == 0x0D
            let signature = v2 ? ProxyProtocol.v2Signature : ProxyProtocol.v1Prefix
            if n <= signature.count {
                return pending[n - 1] == signature[n - 1] ? .needMore : .failure(.missing)
            }
            return v2 ? checkV2() : checkV1()
        }

        private func checkV1() -> Event {
            let n = pending.count
            if n > ProxyProtocol.v1MaxLength { return .failure(.malformed("v1 header longer than 107 bytes")) }
            guard pending[n - 1] == 10 else { return .needMore }
            guard n >= 2, pending[n - 2] == 13 else { return .failure(.malformed("v1 header must end in CRLF")) }
            let text = String(decoding: pending[0..<(n - 2)], as: UTF8.self)
            let parts = text.split(separator: " ", omittingEmptySubsequences: false)
            if parts.count >= 2 && parts[1] == "UNKNOWN" { return .header(.local) }
            guard parts.count == 6, parts[1] == "TCP4" || parts[1] == "TCP6" else {
                return .failure(.malformed("v1 header is not PROXY TCP4|TCP6 SRC DST SPORT DPORT"))
            }
            let v4 = parts[1] == "TCP4"
            guard let src = parseAddress(parts[2], v4: v4), let dst = parseAddress(parts[3], v4: v4),
                  let sport = parsePort(parts[4]), let dport = parsePort(parts[5]) else {
                return .failure(.malformed("v1 header with a bad address or port"))
            }
            return .header(.proxied(source: Endpoint(address: src, port: sport), destination: Endpoint(address: dst, port: dport)))
        }

        private func checkV2() -> Event {
            let n = pending.count
            if n < 16 { return .needMore }
            let versionCommand = pending[12]
            guard versionCommand >> 4 == 2 else { return .failure(.malformed("v2 header with version \(versionCommand >> 4)")) }
            guard versionCommand & 0x0F <= 1 else { return .failure(.malformed("v2 header with command \(versionCommand & 0x0F)")) }
            let length = Int(pending[14]) << 8 | Int(pending[15])
            guard 16 + length <= ProxyProtocol.v2MaxLength else { return .failure(.malformed("v2 header longer than \(ProxyProtocol.v2MaxLength) bytes")) }
            if n < 16 + length { return .needMore }
            if versionCommand & 0x0F == 0 { return .header(.local) }
            let body = Array(pending[16...])
            switch pending[13] {
            case 0x11:  // TCP over IPv4
                guard body.count >= 12 else { return .failure(.malformed("v2 IPv4 addresses truncated")) }
                return .header(.proxied(source: Endpoint(address: Array(body[0..<4]), port: UInt16(body[8]) << 8 | UInt16(body[9])),
                                        destination: Endpoint(address: Array(body[4..<8]), port: UInt16(body[10]) << 8 | UInt16(body[11]))))
            case 0x21:  // TCP over IPv6
                guard body.count >= 36 else { return .failure(.malformed("v2 IPv6 addresses truncated")) }
                return .header(.proxied(source: Endpoint(address: Array(body[0..<16]), port: UInt16(body[32]) << 8 | UInt16(body[33])),
                                        destination: Endpoint(address: Array(body[16..<32]), port: UInt16(body[34]) << 8 | UInt16(body[35]))))
            case 0x00:
                return .header(.local)
            default:
                return .failure(.malformed("v2 header for a family/transport other than TCP over IPv4/IPv6"))
            }
        }

        private func parsePort(_ s: Substring) -> UInt16? {
            guard !s.isEmpty, s.count <= 5, s.allSatisfy({ $0.isASCII && $0.isNumber }), !(s.count > 1 && s.first == "0") else { return nil }
            return UInt16(s)
        }

        private func parseAddress(_ s: Substring, v4: Bool) -> [UInt8]? {
            if v4 {
                let parts = s.split(separator: ".", omittingEmptySubsequences: false)
                guard parts.count == 4 else { return nil }
                var out: [UInt8] = []
                for p in parts {
                    guard !p.isEmpty, p.count <= 3, p.allSatisfy({ $0.isASCII && $0.isNumber }), let v = UInt8(p) else { return nil }
                    out.append(v)
                }
                return out
            }
            return parseIPv6(s)
        }

        private func parseIPv6(_ s: Substring) -> [UInt8]? {
            var head: [UInt16] = []
            var tail: [UInt16] = []
            let pieces = s.split(separator: "::", omittingEmptySubsequences: false)
            guard pieces.count <= 2 else { return nil }
            for (k, piece) in pieces.enumerated() where !piece.isEmpty {
                for g in piece.split(separator: ":", omittingEmptySubsequences: false) {
                    guard !g.isEmpty, g.count <= 4, let v = UInt16(g, radix: 16) else { return nil }
                    if k == 0 { head.append(v) } else { tail.append(v) }
                }
            }
            let sawGap = pieces.count == 2
            let fill = 8 - head.count - tail.count
            guard sawGap ? fill >= 1 : fill == 0 else { return nil }
            let groups = head + [UInt16](repeating: 0, count: sawGap ? fill : 0) + tail
            var out: [UInt8] = []
            for g in groups { out += [UInt8(g >> 8), UInt8(g & 0xFF)] }
            return out
        }
    }
}
