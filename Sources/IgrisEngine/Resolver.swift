import Glibc
import CURing
import IgrisPolicy
import Synchronization

/// Why a name did not resolve; decides the reply code.
public enum ResolveFailure: Error, Sendable, Equatable, CustomStringConvertible {
    /// NXDOMAIN / no address of a usable family.
    case notFound
    /// The resolver could not answer now (EAI_AGAIN).
    case temporary
    case other(String)

    public var description: String {
        switch self {
        case .notFound: return "name not found"
        case .temporary: return "temporary resolver failure"
        case .other(let s): return s
        }
    }
}

/// getaddrinfo on the offload pool, with a cache shared by all workers: answers are kept for
/// `positiveTTL` (getaddrinfo does not report the record's TTL), failures for `negativeTTL`
/// so a client hammering a dead name does not queue a lookup per connection.
public final class Resolver: Sendable {
    public let positiveTTLNanoseconds: UInt64
    public let negativeTTLNanoseconds: UInt64
    public static let maxCachedNames = 10_000

    private struct Entry {
        var addresses: Result<[SocketAddress], ResolveFailure>
        var expires: UInt64
    }

    private let cache = Locked<[String: Entry]>([:])
    private let lookupCount = Atomic<Int64>(0)
    private let hitCount = Atomic<Int64>(0)

    public init(positiveTTLNanoseconds: UInt64 = 60_000_000_000, negativeTTLNanoseconds: UInt64 = 5_000_000_000) {
        self.positiveTTLNanoseconds = positiveTTLNanoseconds
        self.negativeTTLNanoseconds = negativeTTLNanoseconds
    }

    /// Blocking; every address the name has (IPv6 and IPv4, in getaddrinfo's RFC 6724
    /// order), with `port` filled in.
    public func resolve(_ host: String, port: UInt16) -> Result<[SocketAddress], ResolveFailure> {
        let key = host.lowercased()
        let now = Syscall.monotonicNanoseconds()
        if let hit = cache.withLock({ c -> Entry? in
            guard let e = c[key] else { return nil }
            if e.expires <= now { c[key] = nil; return nil }
            return e
        }) {
            hitCount.wrappingAdd(1, ordering: .relaxed)
            return hit.addresses.map { $0.map { $0.withPort(port) } }
        }
        lookupCount.wrappingAdd(1, ordering: .relaxed)
        let answer = Self.getaddrinfo(key)
        let ttl = (try? answer.get()) != nil ? positiveTTLNanoseconds : negativeTTLNanoseconds
        cache.withLock { c in
            if c.count >= Self.maxCachedNames {
                c = c.filter { $0.value.expires > now }
                if c.count >= Self.maxCachedNames { c.removeAll() }
            }
            c[key] = Entry(addresses: answer, expires: now + ttl)
        }
        return answer.map { $0.map { $0.withPort(port) } }
    }

    public var lookups: Int64 { lookupCount.load(ordering: .relaxed) }
    public var cacheHits: Int64 { hitCount.load(ordering: .relaxed) }

    static func getaddrinfo(_ host: String) -> Result<[SocketAddress], ResolveFailure> {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = Glibc.getaddrinfo(host, nil, &hints, &result)
        guard rc == 0 else {
            switch rc {
            // EAI_NODATA (-5) and EAI_ADDRFAMILY (-9) are glibc extensions the module map hides.
            case EAI_NONAME, -5, -9: return .failure(.notFound)
            case EAI_AGAIN: return .failure(.temporary)
            case EAI_SYSTEM: return .failure(.other(Errno.describe(igris_errno())))
            default: return .failure(.other(String(cString: gai_strerror(rc))))
            }
        }
        defer { freeaddrinfo(result) }
        var out: [SocketAddress] = []
        var p = result
        while let ai = p {
            if ai.pointee.ai_family == AF_INET || ai.pointee.ai_family == AF_INET6 {
                var storage = sockaddr_storage()
                withUnsafeMutableBytes(of: &storage) { dst in
                    dst.copyMemory(from: UnsafeRawBufferPointer(start: ai.pointee.ai_addr, count: Int(ai.pointee.ai_addrlen)))
                }
                let address = SocketAddress(storage: storage, length: ai.pointee.ai_addrlen)
                if !out.contains(address) { out.append(address) }
            }
            p = ai.pointee.ai_next
        }
        return out.isEmpty ? .failure(.notFound) : .success(out)
    }
}

extension SocketAddress {
    /// The address as 16 bytes (IPv4 in mapped form), for the ACL.
    public var ipAddress: IPAddress {
        withSockAddr { sa, _ in
            if Int32(sa.pointee.sa_family) == AF_INET6 {
                return sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { p in
                    withUnsafeBytes(of: p.pointee.sin6_addr) { IPAddress(ipv6: $0) }
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
            var sin6 = sockaddr_in6()
            sin6.sin6_family = sa_family_t(AF_INET6)
            sin6.sin6_port = port.bigEndian
            withUnsafeMutableBytes(of: &sin6.sin6_addr) { dst in
                for i in 0..<8 { dst[i] = UInt8(truncatingIfNeeded: ip.high >> (56 - 8 * UInt64(i))) }
                for i in 0..<8 { dst[8 + i] = UInt8(truncatingIfNeeded: ip.low >> (56 - 8 * UInt64(i))) }
            }
            withUnsafeMutableBytes(of: &storage) { dst in withUnsafeBytes(of: sin6) { dst.copyMemory(from: $0) } }
            self.init(storage: storage, length: socklen_t(MemoryLayout<sockaddr_in6>.size))
        }
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
