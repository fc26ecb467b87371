import Glibc
import IgrisEngine
import IgrisPolicy
import IgrisProtocols
import IgrisTLS

/// `source: [address, …]`: the local addresses upstream connections come from, each checked
/// against this host's addresses when the file is read.
func decodeSources(_ c: KeyedDecodingContainer<AnyCodingKey>, _ key: AnyCodingKey) throws -> [SocketAddress] {
    var list = try c.nestedUnkeyedContainer(forKey: key)
    var sources: [SocketAddress] = []
    while !list.isAtEnd {
        let index = list.currentIndex
        let text = try list.decode(String.self)
        switch UpstreamPool.source(text) {
        case .success(let address): sources.append(address)
        case .failure(let problem):
            throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key, AnyCodingKey(intValue: index)], debugDescription: problem.description))
        }
    }
    guard !sources.isEmpty && sources.count <= 256 else {
        throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key], debugDescription: "1 to 256 addresses"))
    }
    return sources
}

struct PoolEntry: Decodable {
    var servers: [SocketAddress] = []
    var balance = BalanceAlgorithm.roundRobin
    var healthCheck: HealthCheck?
    var sendProxyProtocol: ProxyProtocol.Version?
    var tls: TLSClientContext?
    var sources: [SocketAddress] = []

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["servers", "balance", "health_check", "send_proxy_protocol", "upstream_tls", "source"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        func key(_ s: String) -> AnyCodingKey { AnyCodingKey(stringValue: s) }
        func fail(_ path: [CodingKey], _ message: String) -> DecodingError {
            .dataCorrupted(.init(codingPath: c.codingPath + path, debugDescription: message))
        }
        var list = try c.nestedUnkeyedContainer(forKey: key("servers"))
        while !list.isAtEnd {
            let index = list.currentIndex
            let text = try list.decode(String.self)
            do { servers.append(try SocketAddress.resolve(text)) } catch {
                throw fail([key("servers"), AnyCodingKey(intValue: index)], error.description)
            }
        }
        guard (1...UpstreamPool.maxServers).contains(servers.count) else {
            throw fail([key("servers")], "a pool has 1 to \(UpstreamPool.maxServers) servers")
        }
        if let b = try c.decodeIfPresent(String.self, forKey: key("balance")) {
            guard let v = BalanceAlgorithm(rawValue: b) else {
                throw fail([key("balance")], "expected one of \(BalanceAlgorithm.allCases.map(\.rawValue).joined(separator: ", ")), got '\(b)'")
            }
            balance = v
        }
        if let send = try c.decodeIfPresent(String.self, forKey: key("send_proxy_protocol")) {
            guard send == "off" || ProxyProtocol.Version(rawValue: send) != nil else {
                throw fail([key("send_proxy_protocol")], "expected v1, v2 or off, got '\(send)'")
            }
            sendProxyProtocol = ProxyProtocol.Version(rawValue: send)
        }
        tls = try c.decodeIfPresent(TLSClientSection.self, forKey: key("upstream_tls"))?.context
        if c.contains(key("source")) { sources = try decodeSources(c, key("source")) }
        if c.contains(key("health_check")) {
            let h = try c.nestedContainer(keyedBy: AnyCodingKey.self, forKey: key("health_check"))
            let known: Set<String> = ["interval", "timeout", "rise", "fall"]
            for k in h.allKeys where !known.contains(k.stringValue) {
                throw fail([key("health_check"), k], "unknown key '\(k.stringValue)' (expected one of: fall, interval, rise, timeout)")
            }
            var check = HealthCheck()
            for (name, path) in [("interval", \HealthCheck.intervalNanoseconds), ("timeout", \HealthCheck.timeoutNanoseconds)] {
                guard let text = try h.decodeIfPresent(String.self, forKey: key(name)) else { continue }
                guard let ns = DurationText.parse(text), ns > 0 else {
                    throw fail([key("health_check"), key(name)], "expected a duration such as 500ms or 2s, got '\(text)'")
                }
                check[keyPath: path] = ns
            }
            for (name, path) in [("rise", \HealthCheck.rise), ("fall", \HealthCheck.fall)] {
                guard let v = try h.decodeIfPresent(Int.self, forKey: key(name)) else { continue }
                guard (1...100).contains(v) else { throw fail([key("health_check"), key(name)], "must be between 1 and 100") }
                check[keyPath: path] = v
            }
            guard check.timeoutNanoseconds <= check.intervalNanoseconds else {
                throw fail([key("health_check"), key("timeout")], "must not exceed the interval")
            }
            healthCheck = check
        }
    }
}

