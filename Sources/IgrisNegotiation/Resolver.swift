import Glibc
import IgrisEngine
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
        if let hit = cached(host, port: port) { return hit }
        let key = host.lowercased()
        let now = Syscall.monotonicNanoseconds()
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

    /// The cached answer, if there is one (never blocks: a worker may ask).
    public func cached(_ host: String, port: UInt16) -> Result<[SocketAddress], ResolveFailure>? {
        let key = host.lowercased()
        let now = Syscall.monotonicNanoseconds()
        guard let hit = cache.withLock({ c -> Entry? in
            guard let e = c[key] else { return nil }
            if e.expires <= now { c[key] = nil; return nil }
            return e
        }) else { return nil }
        hitCount.wrappingAdd(1, ordering: .relaxed)
        return hit.addresses.map { $0.map { $0.withPort(port) } }
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
            case EAI_SYSTEM: return .failure(.other(Errno.describe(errno)))
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

