/// An IP address as 16 bytes: IPv6 as is, IPv4 as its IPv4-mapped form (::ffff:a.b.c.d).
/// One representation means one set of rules covers both families, and an IPv4-mapped IPv6
/// destination can never slip past an IPv4 rule.
public struct IPAddress: Hashable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    public init(ipv4 a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        high = 0
        low = 0xFFFF_0000_0000 | UInt64(a) << 24 | UInt64(b) << 16 | UInt64(c) << 8 | UInt64(d)
    }

    /// An IPv4 address as a host-order 32-bit value.
    public init(ipv4 value: UInt32) {
        self.init(ipv4: UInt8(value >> 24), UInt8(value >> 16 & 0xFF), UInt8(value >> 8 & 0xFF), UInt8(value & 0xFF))
    }

    /// 16 bytes in network order.
    @inlinable
    public init<C: Collection>(ipv6 bytes: C) where C.Element == UInt8 {
        precondition(bytes.count == 16)
        var h: UInt64 = 0
        var l: UInt64 = 0
        for (i, b) in bytes.enumerated() {
            if i < 8 { h = h << 8 | UInt64(b) } else { l = l << 8 | UInt64(b) }
        }
        high = h
        low = l
    }

    public var isIPv4Mapped: Bool { high == 0 && low >> 32 == 0xFFFF }

    /// Parses dotted IPv4 or RFC 4291 IPv6 text (no zone, no brackets).
    public init?(_ text: Substring) {
        if !text.contains(":") {
            let parts = text.split(separator: ".", omittingEmptySubsequences: false)
            guard parts.count == 4 else { return nil }
            var bytes: [UInt8] = []
            for p in parts {
                guard !p.isEmpty, p.count <= 3, p.allSatisfy({ $0.isASCII && $0.isNumber }), let v = UInt8(p) else { return nil }
                bytes.append(v)
            }
            self.init(ipv4: bytes[0], bytes[1], bytes[2], bytes[3])
            return
        }
        // IPv6: up to 8 groups, one "::", an optional trailing dotted IPv4.
        var groups: [UInt16] = []
        var gap: Int? = nil
        var rest = text
        if rest.hasPrefix("::") {
            gap = 0
            rest = rest.dropFirst(2)
        }
        while !rest.isEmpty {
            let end = rest.firstIndex(of: ":") ?? rest.endIndex
            let piece = rest[..<end]
            if piece.contains(".") {
                guard end == rest.endIndex, let v4 = IPAddress(piece) else { return nil }
                groups.append(UInt16(truncatingIfNeeded: v4.low >> 16))
                groups.append(UInt16(truncatingIfNeeded: v4.low))
                rest = rest[end...]
                break
            }
            guard !piece.isEmpty, piece.count <= 4, let v = UInt16(piece, radix: 16) else { return nil }
            groups.append(v)
            rest = rest[end...]
            if rest.hasPrefix("::") {
                guard gap == nil else { return nil }
                gap = groups.count
                rest = rest.dropFirst(2)
            } else if rest.hasPrefix(":") {
                rest = rest.dropFirst()
                if rest.isEmpty { return nil }
            }
        }
        if let g = gap {
            guard groups.count < 8 else { return nil }
            groups.insert(contentsOf: [UInt16](repeating: 0, count: 8 - groups.count), at: g)
        }
        guard groups.count == 8 else { return nil }
        var bytes: [UInt8] = []
        for g in groups { bytes += [UInt8(g >> 8), UInt8(g & 0xFF)] }
        self.init(ipv6: bytes)
    }

    public var description: String {
        if isIPv4Mapped {
            let v = UInt32(truncatingIfNeeded: low)
            return "\(v >> 24).\(v >> 16 & 0xFF).\(v >> 8 & 0xFF).\(v & 0xFF)"
        }
        var groups: [String] = []
        for i in 0..<8 {
            let word = i < 4 ? high >> (48 - 16 * UInt64(i)) : low >> (48 - 16 * UInt64(i - 4))
            groups.append(String(UInt16(truncatingIfNeeded: word), radix: 16))
        }
        return groups.joined(separator: ":")
    }
}

/// An address prefix: `10.0.0.0/8`, `fc00::/7`. IPv4 prefixes are stored in mapped form
/// (length + 96).
public struct CIDR: Hashable, Sendable, CustomStringConvertible {
    public var address: IPAddress
    /// 0…128 in the 16-byte space.
    public var length: Int
    private let text: String

    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(parts[0]) else { return nil }
        let isIPv4 = !parts[0].contains(":")
        let maxLength = isIPv4 ? 32 : 128
        var length = maxLength
        if parts.count == 2 {
            guard !parts[1].isEmpty, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }), let l = Int(parts[1]), l <= maxLength else { return nil }
            length = l
        }
        self.length = isIPv4 ? length + 96 : length
        self.address = CIDR.masked(address, self.length)
        self.text = text
    }

    public func contains(_ a: IPAddress) -> Bool {
        CIDR.masked(a, length) == address
    }

    static func masked(_ a: IPAddress, _ length: Int) -> IPAddress {
        func mask(_ bits: Int) -> UInt64 { bits <= 0 ? 0 : bits >= 64 ? .max : ~(UInt64.max >> UInt64(bits)) }
        return IPAddress(high: a.high & mask(length), low: a.low & mask(length - 64))
    }

    public var description: String { text }
}
