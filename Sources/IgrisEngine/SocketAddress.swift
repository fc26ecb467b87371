import Glibc
import IgrisPolicy
import CLinux

/// An IPv4 or IPv6 socket address in a `sockaddr_storage`, plus the text it was parsed from.
public struct SocketAddress: Sendable, CustomStringConvertible, Equatable {
    public var storage: sockaddr_storage
    public var length: socklen_t

    public init(storage: sockaddr_storage, length: socklen_t) {
        self.storage = storage
        self.length = length
    }

    public var family: Int32 { Int32(storage.ss_family) }

    public var port: UInt16 {
        withSockAddr { sa, _ in
            if Int32(sa.pointee.sa_family) == AF_INET6 {
                return sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
    }

    public func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws(SyscallError) -> R) throws(SyscallError) -> R {
        var copy = storage
        return try withUnsafePointer(to: &copy) { p throws(SyscallError) -> R in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sp throws(SyscallError) -> R in try body(sp, length) }
        }
    }

    public func withSockAddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        var copy = storage
        return withUnsafePointer(to: &copy) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
        }
    }

    /// Numeric host and port: `127.0.0.1:80`, `[::1]:80`. (inet_ntop, not getnameinfo: the
    /// access log formats one or two of these per connection.)
    public var description: String {
        withUnsafeBytes(of: storage) { raw -> String in
            switch family {
            case AF_INET:
                // By hand: glibc's inet_ntop formats IPv4 with sprintf.
                let b = (raw.baseAddress! + MemoryLayout<sockaddr_in>.offset(of: \sockaddr_in.sin_addr)!).assumingMemoryBound(to: UInt8.self)
                return "\(b[0]).\(b[1]).\(b[2]).\(b[3]):\(port)"
            case AF_INET6:
                var host = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
                let a = raw.baseAddress! + MemoryLayout<sockaddr_in6>.offset(of: \sockaddr_in6.sin6_addr)!
                guard inet_ntop(AF_INET6, a, &host, socklen_t(host.count)) != nil else { break }
                return "[\(host.withUnsafeBufferPointer { String(cString: $0.baseAddress!) })]:\(port)"
            default:
                break
            }
            return "<address family \(family)>"
        }
    }

    public static func == (a: SocketAddress, b: SocketAddress) -> Bool {
        a.length == b.length && withUnsafeBytes(of: a.storage) { pa in
            withUnsafeBytes(of: b.storage) { pb in
                pa.prefix(Int(a.length)).elementsEqual(pb.prefix(Int(b.length)))
            }
        }
    }
}

/// Why a `HOST:PORT` could not become an address; `description` is the operator's one line.
public enum AddressError: Error, CustomStringConvertible, Sendable, Equatable {
    case malformed(String, reason: String)
    case unresolvable(String, reason: String)

    public var description: String {
        switch self {
        case .malformed(let text, let reason): return "malformed address '\(text)': \(reason)"
        case .unresolvable(let text, let reason): return "cannot resolve '\(text)': \(reason)"
        }
    }
}

extension SocketAddress {
    /// When set, `resolve` accepts only numeric hosts (no DNS): the configuration fuzzer sets
    /// it so random host names don't each wait on a resolver. Set once, before any thread.
    nonisolated(unsafe) public static var numericHostsOnly = false

    /// Splits `HOST:PORT` / `[V6]:PORT` into host and port, validating the port.
    public static func split(_ text: String) throws(AddressError) -> (host: String, port: UInt16) {
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else {
                throw .malformed(text, reason: "missing ']' after IPv6 address")
            }
            host = text[text.index(after: text.startIndex)..<close]
            let rest = text[text.index(after: close)...]
            guard rest.hasPrefix(":") else { throw .malformed(text, reason: "expected [IPV6]:PORT") }
            portText = rest.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { throw .malformed(text, reason: "expected HOST:PORT") }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            if host.contains(":") { throw .malformed(text, reason: "IPv6 addresses need brackets: [ADDR]:PORT") }
        }
        if host.isEmpty { throw .malformed(text, reason: "empty host") }
        guard !portText.isEmpty, portText.allSatisfy({ $0.isASCII && $0.isNumber }), let port = UInt16(portText) else {
            throw .malformed(text, reason: "port must be a number from 0 to 65535")
        }
        return (String(host), port)
    }

    /// Parses and resolves `HOST:PORT` (getaddrinfo; the first result wins, as for a single
    /// upstream). `passive` for listen addresses. Blocking: call at start-up, never on a worker.
    public static func resolve(_ text: String, passive: Bool = false) throws(AddressError) -> SocketAddress {
        let (host, port) = try split(text)
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0) | (numericHostsOnly ? AI_NUMERICHOST : 0)
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &result)
        guard rc == 0, let first = result else {
            let reason = rc == EAI_SYSTEM ? Errno.describe(igris_errno()) : String(cString: gai_strerror(rc))
            throw .unresolvable(text, reason: reason)
        }
        defer { freeaddrinfo(result) }
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { dst in
            dst.copyMemory(from: UnsafeRawBufferPointer(start: first.pointee.ai_addr, count: Int(first.pointee.ai_addrlen)))
        }
        return SocketAddress(storage: storage, length: first.pointee.ai_addrlen)
    }
}

extension SocketAddress {
    /// The address as 16 bytes (IPv4 in mapped form), for the ACL.
    public var ipAddress: IPAddress {
        withSockAddr { sa, _ in
            if Int32(sa.pointee.sa_family) == AF_INET6 {
                // Two loads, no generic byte loop: this runs per accepted connection and per datagram.
                return sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { p in
                    withUnsafeBytes(of: p.pointee.sin6_addr) { raw in
                        IPAddress(high: UInt64(bigEndian: raw.loadUnaligned(as: UInt64.self)),
                                  low: UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
                    }
                }
            }
            return sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { p in
                let v = UInt32(bigEndian: p.pointee.sin_addr.s_addr)
                return IPAddress(ipv4: UInt8(v >> 24), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF))
            }
        }
    }

    /// An IPv4 (when mapped) or IPv6 socket address.
    public init(ip: IPAddress, port: UInt16) {
        var storage = sockaddr_storage()
        if ip.isIPv4Mapped {
            var sin = sockaddr_in()
            sin.sin_family = sa_family_t(AF_INET)
            sin.sin_port = port.bigEndian
            sin.sin_addr.s_addr = UInt32(truncatingIfNeeded: ip.low).bigEndian
            withUnsafeMutableBytes(of: &storage) { dst in withUnsafeBytes(of: sin) { dst.copyMemory(from: $0) } }
            self.init(storage: storage, length: socklen_t(MemoryLayout<sockaddr_in>.size))
        } else {
            self.init(ipv6Form: ip, port: port)
        }
    }

    /// An IPv6 socket address, an IPv4 one as its mapped form (what a dual-stack socket takes).
    init(ipv6Form ip: IPAddress, port: UInt16) {
        var sin6 = sockaddr_in6()
        sin6.sin6_family = sa_family_t(AF_INET6)
        sin6.sin6_port = port.bigEndian
        withUnsafeMutableBytes(of: &sin6.sin6_addr) { dst in
            for i in 0..<8 { dst[i] = UInt8(truncatingIfNeeded: ip.high >> (56 - 8 * UInt64(i))) }
            for i in 0..<8 { dst[8 + i] = UInt8(truncatingIfNeeded: ip.low >> (56 - 8 * UInt64(i))) }
        }
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { dst in withUnsafeBytes(of: sin6) { dst.copyMemory(from: $0) } }
        self.init(storage: storage, length: socklen_t(MemoryLayout<sockaddr_in6>.size))
    }

    public func withPort(_ port: UInt16) -> SocketAddress {
        var copy = self
        withUnsafeMutableBytes(of: &copy.storage) { raw in
            // sin_port and sin6_port sit at the same offset.
            raw.storeBytes(of: port.bigEndian, toByteOffset: MemoryLayout<sockaddr_in>.offset(of: \sockaddr_in.sin_port)!, as: UInt16.self)
        }
        return copy
    }
}
