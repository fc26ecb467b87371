/// The header of every datagram of a SOCKS5 UDP association (RFC 1928 §7):
/// `RSV(2) FRAG(1) ATYP(1) DST.ADDR DST.PORT(2) DATA`. From the client it names where the data
/// goes; to the client, where it came from.
public enum Socks5UDP {
    /// Why a client's datagram header is unusable.
    public enum Drop: Error, Equatable, Sendable, CaseIterable {
        /// Shorter than its header.
        case short
        /// RSV not zero.
        case reserved
        /// FRAG ≠ 0: fragmentation is optional (§7) and not done here.
        case fragmented
        case addressType
    }

    public struct Header: Equatable, Sendable {
        public var address: Socks5.Address
        public var port: UInt16
        /// Where the data starts.
        public var length: Int
    }

    /// Parses a client datagram's header.
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Result<Header, Drop> {
        guard bytes.count >= 4 else { return .failure(.short) }
        guard bytes[0] == 0, bytes[1] == 0 else { return .failure(.reserved) }
        guard bytes[2] == 0 else { return .failure(.fragmented) }
        let address: Socks5.Address
        var i = 4
        switch Socks5.AddressType(rawValue: bytes[3]) {
        case .ipv4:
            guard bytes.count >= i + 6 else { return .failure(.short) }
            address = .ipv4(bytes[4], bytes[5], bytes[6], bytes[7])
            i += 4
        case .ipv6:
            guard bytes.count >= i + 18 else { return .failure(.short) }
            address = .ipv6(Array(bytes[4..<20]))
            i += 16
        case .domainName:
            guard bytes.count >= 5 else { return .failure(.short) }
            let n = Int(bytes[4])
            guard n > 0, bytes.count >= 5 + n + 2 else { return .failure(.short) }
            let name = Array(bytes[5..<(5 + n)])
            guard name.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else { return .failure(.addressType) }
            address = .domain(String(decoding: name, as: UTF8.self))
            i += 1 + n
        case nil:
            return .failure(.addressType)
        }
        let port = UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1])
        return .success(Header(address: address, port: port, length: i + 2))
    }

    /// `header(from:port:)` for an IP source, written in place (10 or 22 bytes; `into` has
    /// room for 22): the relay's per-datagram path, which must not allocate.
    /// `high`/`low`: the address as two big-endian halves, IPv4 as its mapped form.
    public static func writeHeader(high: UInt64, low: UInt64, port: UInt16, into out: UnsafeMutableRawBufferPointer) -> Int {
        out.storeBytes(of: UInt16(0), toByteOffset: 0, as: UInt16.self)
        out[2] = 0
        var i = 4
        if high == 0 && low >> 32 == 0xFFFF {
            out[3] = Socks5.AddressType.ipv4.rawValue
            out.storeBytes(of: UInt32(truncatingIfNeeded: low).bigEndian, toByteOffset: 4, as: UInt32.self)
            i += 4
        } else {
            out[3] = Socks5.AddressType.ipv6.rawValue
            out.storeBytes(of: high.bigEndian, toByteOffset: 4, as: UInt64.self)
            out.storeBytes(of: low.bigEndian, toByteOffset: 12, as: UInt64.self)
            i += 16
        }
        out.storeBytes(of: port.bigEndian, toByteOffset: i, as: UInt16.self)
        return i + 2
    }

    /// The header for a datagram to the client from `address`:`port` (IPv4 or IPv6).
    public static func header(from address: Socks5.Address, port: UInt16) -> [UInt8] {
        var out: [UInt8] = [0, 0, 0]
        switch address {
        case let .ipv4(a, b, c, d): out += [Socks5.AddressType.ipv4.rawValue, a, b, c, d]
        case .ipv6(let bytes): out += [Socks5.AddressType.ipv6.rawValue] + bytes
        case .domain(let name): out += [Socks5.AddressType.domainName.rawValue, UInt8(name.utf8.count)] + Array(name.utf8)
        }
        return out + [UInt8(port >> 8), UInt8(port & 0xFF)]
    }
}
