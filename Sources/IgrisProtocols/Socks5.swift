/// SOCKS version 5 (RFC 1928) and its username/password sub-negotiation (RFC 1929): the
/// wire constants and reply encoding. Parsing is `Socks5ServerHandshake`.
public enum Socks5 {
    public static let version: UInt8 = 5
    /// RFC 1929's sub-negotiation version.
    public static let authVersion: UInt8 = 1

    public enum Method: UInt8, Sendable {
        case noAuthentication = 0x00
        case usernamePassword = 0x02
        case noAcceptableMethods = 0xFF
    }

    public enum Command: UInt8, Sendable {
        case connect = 1
        case bind = 2
        case udpAssociate = 3
    }

    public enum AddressType: UInt8, Sendable {
        case ipv4 = 1
        case domainName = 3
        case ipv6 = 4
    }

    /// REP field of a reply (RFC 1928 §6).
    public enum Reply: UInt8, Sendable, CaseIterable {
        case succeeded = 0x00
        case generalFailure = 0x01
        case notAllowedByRuleset = 0x02
        case networkUnreachable = 0x03
        case hostUnreachable = 0x04
        case connectionRefused = 0x05
        case ttlExpired = 0x06
        case commandNotSupported = 0x07
        case addressTypeNotSupported = 0x08
    }

    /// The server's choice of method: `VER METHOD`.
    public static func methodSelection(_ method: Method) -> [UInt8] { [version, method.rawValue] }

    /// RFC 1929 status: 0 is success, anything else fails and the server closes.
    public static func authenticationStatus(succeeded: Bool) -> [UInt8] { [authVersion, succeeded ? 0 : 1] }

    /// `VER REP RSV ATYP BND.ADDR BND.PORT`. Failures carry an all-zero IPv4 address.
    public static func reply(_ code: Reply, bound: Address = .ipv4(0, 0, 0, 0), port: UInt16 = 0) -> [UInt8] {
        var out: [UInt8] = [version, code.rawValue, 0]
        bound.encode(into: &out)
        out.append(UInt8(port >> 8))
        out.append(UInt8(port & 0xFF))
        return out
    }

    /// DST.ADDR / BND.ADDR.
    public enum Address: Equatable, Sendable, CustomStringConvertible {
        case ipv4(UInt8, UInt8, UInt8, UInt8)
        /// 16 bytes, network order.
        case ipv6([UInt8])
        case domain(String)

        func encode(into out: inout [UInt8]) {
            switch self {
            case let .ipv4(a, b, c, d):
                out.append(AddressType.ipv4.rawValue)
                out += [a, b, c, d]
            case .ipv6(let bytes):
                out.append(AddressType.ipv6.rawValue)
                out += bytes
            case .domain(let name):
                let utf8 = Array(name.utf8.prefix(255))
                out.append(AddressType.domainName.rawValue)
                out.append(UInt8(utf8.count))
                out += utf8
            }
        }

        public var description: String {
            switch self {
            case let .ipv4(a, b, c, d): return "\(a).\(b).\(c).\(d)"
            case .ipv6(let bytes):
                var groups: [String] = []
                for i in stride(from: 0, to: 16, by: 2) {
                    groups.append(String(UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]), radix: 16))
                }
                return "[" + groups.joined(separator: ":") + "]"
            case .domain(let name): return name
            }
        }
    }

    /// A CONNECT request: where the client wants to go.
    public struct Request: Equatable, Sendable {
        public var command: Command
        public var address: Address
        public var port: UInt16

        public init(command: Command, address: Address, port: UInt16) {
            self.command = command
            self.address = address
            self.port = port
        }
    }

    /// Why a handshake failed, and the bytes to send before closing (nil: just close).
    public enum Failure: Error, Equatable, Sendable {
        /// The greeting's version byte is not 5 (SOCKS4, HTTP, noise).
        case unsupportedVersion(UInt8)
        /// RFC 1929 sub-negotiation with a bad version or an empty username.
        case malformedCredentials
        /// A request whose version or reserved byte is wrong, or whose domain is empty or not
        /// printable.
        case malformedRequest
        case addressTypeNotSupported(UInt8)
        case commandNotSupported(UInt8)

        public var reply: [UInt8] {
            switch self {
            case .unsupportedVersion: return Socks5.methodSelection(.noAcceptableMethods)
            case .malformedCredentials: return Socks5.authenticationStatus(succeeded: false)
            case .malformedRequest: return Socks5.reply(.generalFailure)
            case .addressTypeNotSupported: return Socks5.reply(.addressTypeNotSupported)
            case .commandNotSupported: return Socks5.reply(.commandNotSupported)
            }
        }
    }
}
