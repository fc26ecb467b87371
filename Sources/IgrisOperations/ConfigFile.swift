import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisPolicy
import IgrisProtocols
import IgrisTLS

/// The YAML configuration file (`igris serve -c FILE`, `igris check -c FILE`).
///
/// Every key is optional except `listeners`; unknown keys are errors, and every error names
/// its key path and line. See deploy/ for complete examples.
public struct ConfigFile: Sendable {
    public struct Listener: Sendable {
        public var name: String
        public var listen: SocketAddress
        public var listenText: String
        public var mode: ListenerMode
        /// forward: a single upstream, or the name of a pool.
        public var upstream: SocketAddress?
        public var pool: String?
        /// socks5 / http_connect: password (default) or none
        public var requireAuthentication: Bool
        /// Connections start with a PROXY v1/v2 header from a balancer (strict).
        public var acceptProxyProtocol = false
        /// The balancers allowed to send PROXY headers (required with accept_proxy_protocol).
        public var proxyProtocolFrom: [CIDR] = []
        /// forward: send a PROXY header to the upstream.
        public var sendProxyProtocol: ProxyProtocol.Version?
        /// Overrides of the file's global settings for this listener.
        public var splice: SpliceMode?
        public var connectTimeoutNanoseconds: UInt64?
        public var idleTimeoutNanoseconds: UInt64??
        public var deadPeerTimeoutNanoseconds: UInt64??
        public var handshakeTimeoutNanoseconds: UInt64?
        public var maxConnections: Int?
        /// TLS with clients (`tls:`), and toward a single upstream (`upstream_tls:`).
        public var tls: TLSServerContext?
        public var upstreamTLS: TLSClientContext?
        /// forward with upstream: the local addresses to connect from (`source:`).
        public var upstreamSources: [SocketAddress] = []
    }

    public var workers: Int?
    public var backend: BackendChoice = .auto
    /// nil: what RLIMIT_NOFILE allows (`Server.defaultMaxConnections`).
    public var maxConnections: Int?
    /// nil: `SourceLimits.Settings.defaults` for max_connections; 0: no limit.
    public var maxConnectionsPerSource: Int?
    public var maxHandshakes: Int?
    public var maxHandshakesPerSource: Int?
    public var bufferSize: Int = 64 * 1024
    /// Pooled buffers per worker at most; nil: derived from `bufferMemory`.
    public var buffers: Int?
    /// Memory for pooled buffers, all workers together; nil: the default for max_connections.
    public var bufferMemory: Int?
    public var splice: SpliceMode = .auto
    /// `direct_descriptors` (io_uring): see `ServerConfiguration.directDescriptors`.
    public var directDescriptors = false
    /// `listen_backlog`: see `ServerConfiguration.listenBacklog`.
    public var listenBacklog: Int32 = 1024
    /// `busy_poll`: see `ServerConfiguration.busyPollNanoseconds`.
    public var busyPollNanoseconds: UInt64 = 0
    public var connectTimeoutNanoseconds: UInt64 = 5_000_000_000
    public var idleTimeoutNanoseconds: UInt64?
    /// Keepalive + TCP_USER_TIMEOUT bound for peers gone without FIN or RST (nil: off).
    public var deadPeerTimeoutNanoseconds: UInt64? = 120_000_000_000
    public var drainTimeoutNanoseconds: UInt64 = 30_000_000_000
    /// On SIGTERM, how long accepting goes on after /readyz turns 503 (a balancer's health
    /// checks notice first, so no connection reaches a closing listener).
    public var drainGraceNanoseconds: UInt64 = 0
    /// The unix socket a successor takes the listeners over from (`--takeover`); nil: none.
    public var handoffSocket: String?
    /// `udp_relay_ports: 40000-40999`: where UDP ASSOCIATE relays bind (nil: ephemeral).
    public var udpRelayPorts: ClosedRange<UInt16>?
    public var handshakeTimeoutNanoseconds: UInt64 = 10_000_000_000
    public var usersFile: String?
    public var aclRules: [DestinationACL.Rule] = []
    public var logLevel: String = "info"
    public var accessLog = true
    public var listeners: [Listener] = []
    /// Upstream pools by name, for forward listeners.
    public var pools: [String: UpstreamPool] = [:]

    /// Reads, parses and validates `path` (a users file it names is loaded by `policy()`).
    public static func load(path: String) throws(YAMLFileError) -> ConfigFile {
        guard let text = UserDirectory.readFile(path) else {
            throw YAMLFileError(file: path, keyPath: "", line: nil, message: "cannot read the configuration file: \(String(cString: strerror(errno)))")
        }
        return try parse(text, file: path)
    }

    public static func parse(_ text: String, file: String) throws(YAMLFileError) -> ConfigFile {
        try StrictYAML.decode(Decoded.self, from: text, file: file).config
    }

    /// `users_file`, relative to the configuration file's directory unless absolute.
    public func usersPath(configPath: String) -> String? {
        guard var path = usersFile else { return nil }
        if !path.hasPrefix("/"), let slash = configPath.lastIndex(of: "/") {
            path = String(configPath[...slash]) + path
        }
        return path
    }

    /// The users file and ACL as the gateway enforces them. Relative paths are relative to
    /// the configuration file's directory.
    public func policy(configPath: String) throws(YAMLFileError) -> GatewayPolicy {
        var authenticator: Authenticator? = nil
        if let path = usersPath(configPath: configPath) {
            let directory = try UserDirectory.load(path: path)
            do {
                authenticator = try Authenticator(directory: directory)
            } catch {
                throw YAMLFileError(file: path, keyPath: "", line: nil, message: "\(error)")
            }
        }
        if authenticator == nil, let l = listeners.first(where: { ($0.mode == .socks5 || $0.mode == .httpConnect) && $0.requireAuthentication }) {
            throw YAMLFileError(file: configPath, keyPath: "users_file", line: nil,
                                message: "listener '\(l.name)' uses auth: password, so users_file is required (or give the listener auth: none)")
        }
        return GatewayPolicy(acl: DestinationACL(rules: aclRules), authenticator: authenticator)
    }

    /// The engine's listeners: every one except admin ones (served by `AdminServer`), their
    /// negotiations bound to `gateway`.
    public func listenerRules(gateway: Gateway) throws(GatewayError) -> [ListenerRule] {
        var rules: [ListenerRule] = []
        for l in listeners where l.mode != .admin {
            let options = GatewayOptions(requireAuthentication: l.requireAuthentication,
                                         handshakeTimeoutNanoseconds: l.handshakeTimeoutNanoseconds ?? handshakeTimeoutNanoseconds)
            var pool: UpstreamPool? = nil
            if l.mode == .forward {
                pool = l.pool.flatMap { pools[$0] } ?? l.upstream.map { UpstreamPool(name: l.name, servers: [$0], tls: l.upstreamTLS, sources: l.upstreamSources) }
            }
            var rule = try gateway.rule(listen: l.listen, name: l.name, mode: l.mode, pool: pool, options: options,
                                        acceptProxyProtocol: l.acceptProxyProtocol,
                                        trustedProxies: l.acceptProxyProtocol ? l.proxyProtocolFrom : nil)
            rule.sendProxyProtocol = l.sendProxyProtocol
            rule.splice = l.splice
            rule.connectTimeoutNanoseconds = l.connectTimeoutNanoseconds
            rule.idleTimeoutNanoseconds = l.idleTimeoutNanoseconds
            rule.deadPeerTimeoutNanoseconds = l.deadPeerTimeoutNanoseconds
            rule.maxConnections = l.maxConnections
            rule.tls = l.tls
            rule.handshakeTimeoutNanoseconds = l.handshakeTimeoutNanoseconds ?? handshakeTimeoutNanoseconds
            rules.append(rule)
        }
        return rules
    }

    /// The engine's configuration, with `listenerRules(gateway:)` and the users' accounts.
    public func serverConfiguration(gateway: Gateway) throws(GatewayError) -> ServerConfiguration {
        var c = ServerConfiguration(listeners: try listenerRules(gateway: gateway), workers: workers ?? Syscall.onlineCPUs(), backend: backend)
        c.accounts = gateway.policy.accounts
        c.directDescriptors = directDescriptors
        c.listenBacklog = listenBacklog
        c.busyPollNanoseconds = busyPollNanoseconds
        let maxConnections = self.maxConnections ?? Server.defaultMaxConnections(
            workers: c.workers, listeners: c.listeners.count, direct: Server.usesDirectDescriptors(directDescriptors, backend: backend))
        c.maxConnections = maxConnections
        c.maxConnectionsGiven = self.maxConnections != nil
        c.sourceLimits = SourceLimits.Settings.resolved(maxConnections: maxConnections, perSource: maxConnectionsPerSource,
                                                        handshakes: maxHandshakes, handshakesPerSource: maxHandshakesPerSource)
        let memory = bufferMemory ?? BackendConfiguration.defaultBufferMemory(maxConnections: maxConnections, workers: c.workers)
        c.buffers = BackendConfiguration(bufferSize: bufferSize,
                                         bufferCount: buffers ?? BackendConfiguration.bufferCount(memory: memory, bufferSize: bufferSize, workers: c.workers))
        c.splice = splice
        c.connectTimeoutNanoseconds = connectTimeoutNanoseconds
        c.idleTimeoutNanoseconds = idleTimeoutNanoseconds
        c.deadPeerTimeoutNanoseconds = deadPeerTimeoutNanoseconds
        c.drainTimeoutNanoseconds = drainTimeoutNanoseconds
        c.accessLog = accessLog
        c.udpRelayPorts = udpRelayPorts
        return c
    }
}

/// Decoding with key checks; semantic errors are thrown at the key they concern so
/// `StrictYAML` can report its line.
private struct Decoded: Decodable {
    var config = ConfigFile()

    init(from decoder: Decoder) throws {
        let top = ["workers", "backend", "direct_descriptors", "listen_backlog", "busy_poll", "max_connections", "max_connections_per_source", "max_handshakes", "max_handshakes_per_source", "buffer_size", "buffers", "buffer_memory", "splice", "connect_timeout", "idle_timeout", "dead_peer_timeout",
                   "drain_timeout", "drain_grace", "handoff_socket", "handshake_timeout", "udp_relay_ports", "users_file", "acl", "log", "pools", "listeners"]
        try decoder.rejectUnknownKeys(Set(top))
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        func key(_ s: String) -> AnyCodingKey { AnyCodingKey(stringValue: s) }
        func fail(_ k: String, _ message: String) -> DecodingError {
            .dataCorrupted(.init(codingPath: c.codingPath + [key(k)], debugDescription: message))
        }
        if let w = try c.decodeIfPresent(Int.self, forKey: key("workers")) {
            guard (1...1024).contains(w) else { throw fail("workers", "must be between 1 and 1024") }
            config.workers = w
        }
        if let b = try c.decodeIfPresent(String.self, forKey: key("backend")) {
            guard let v = BackendChoice(rawValue: b) else { throw fail("backend", "expected auto, io_uring or epoll, got '\(b)'") }
            config.backend = v
        }
        if let d = try c.decodeIfPresent(Bool.self, forKey: key("direct_descriptors")) { config.directDescriptors = d }
        if let b = try c.decodeIfPresent(Int.self, forKey: key("listen_backlog")) {
            guard (1...65535).contains(b) else { throw fail("listen_backlog", "must be between 1 and 65535") }
            config.listenBacklog = Int32(b)
        }
        if let m = try c.decodeIfPresent(Int.self, forKey: key("max_connections")) {
            guard m >= 1 else { throw fail("max_connections", "must be at least 1") }
            config.maxConnections = m
        }
        for (name, path) in [("max_connections_per_source", \ConfigFile.maxConnectionsPerSource), ("max_handshakes", \.maxHandshakes),
                             ("max_handshakes_per_source", \.maxHandshakesPerSource)] {
            guard let m = try c.decodeIfPresent(Int.self, forKey: key(name)) else { continue }
            guard m >= 0 else { throw fail(name, "must be 0 (no limit) or more") }
            config[keyPath: path] = m
        }
        if let b = try c.decodeIfPresent(Int.self, forKey: key("buffer_size")) {
            guard (1024...(1 << 20)).contains(b) else { throw fail("buffer_size", "must be between 1024 and 1048576") }
            config.bufferSize = b
        }
        if let b = try c.decodeIfPresent(Int.self, forKey: key("buffers")) {
            guard (2...32768).contains(b), b & (b - 1) == 0 else { throw fail("buffers", "must be a power of two between 2 and 32768") }
            config.buffers = b
        }
        if let text = try c.decodeIfPresent(String.self, forKey: key("buffer_memory")) {
            guard config.buffers == nil else { throw fail("buffer_memory", "buffers and buffer_memory contradict each other: choose one") }
            guard let bytes = ByteSize.parse(text), bytes >= UInt64(config.bufferSize * 2) else {
                throw fail("buffer_memory", "expected a size such as 64MiB or 1GiB, at least two buffers, got '\(text)'")
            }
            config.bufferMemory = Int(bytes)
        }
        if let s = try c.decodeIfPresent(String.self, forKey: key("splice")) {
            guard let v = SpliceMode(rawValue: s) else { throw fail("splice", "expected auto, always or never, got '\(s)'") }
            config.splice = v
        }
        func duration(_ k: String, allowZero: Bool = false) throws -> UInt64? {
            guard let text = try c.decodeIfPresent(String.self, forKey: key(k)) else { return nil }
            guard let ns = DurationText.parse(text), allowZero || ns > 0 else {
                throw fail(k, "expected a duration such as 500ms, 5s, 2m or 1h, got '\(text)'")
            }
            return ns
        }
        if let d = try duration("connect_timeout") { config.connectTimeoutNanoseconds = d }
        if let d = try duration("busy_poll", allowZero: true) {
            guard d <= ServerConfiguration.busyPollLimitNanoseconds else { throw fail("busy_poll", "must be at most 1s") }
            config.busyPollNanoseconds = d
        }
        config.idleTimeoutNanoseconds = try duration("idle_timeout")
        if let text = try c.decodeIfPresent(String.self, forKey: key("dead_peer_timeout")), text == "none" || text == "off" {
            config.deadPeerTimeoutNanoseconds = nil
        } else if let d = try duration("dead_peer_timeout") {
            config.deadPeerTimeoutNanoseconds = d
        }
        if let d = try duration("drain_timeout", allowZero: true) { config.drainTimeoutNanoseconds = d }
        if let d = try duration("drain_grace", allowZero: true) { config.drainGraceNanoseconds = d }
        if let text = try c.decodeIfPresent(String.self, forKey: key("udp_relay_ports")) {
            guard let range = PortRange.parse(text) else { throw fail("udp_relay_ports", "expected a port range such as 40000-40999, got '\(text)'") }
            config.udpRelayPorts = range
        }
        if let path = try c.decodeIfPresent(String.self, forKey: key("handoff_socket")) {
            guard ListenerHandoff.isValidPath(path) else {
                throw fail("handoff_socket", "expected an absolute path shorter than 108 bytes, got '\(path)'")
            }
            config.handoffSocket = path
        }
        if let d = try duration("handshake_timeout") { config.handshakeTimeoutNanoseconds = d }
        config.usersFile = try c.decodeIfPresent(String.self, forKey: key("users_file"))
        if c.contains(key("acl")) {
            let acl = try c.decode(ACLSection.self, forKey: key("acl"))
            config.aclRules = acl.rules
        }
        if c.contains(key("log")) {
            let log = try c.decode(LogSection.self, forKey: key("log"))
            config.logLevel = log.level
            config.accessLog = log.accessLog
        }
        if c.contains(key("pools")) {
            let pools = try c.nestedContainer(keyedBy: AnyCodingKey.self, forKey: key("pools"))
            for name in pools.allKeys {
                let entry = try pools.decode(PoolEntry.self, forKey: name)
                config.pools[name.stringValue] = UpstreamPool(name: name.stringValue, servers: entry.servers, balance: entry.balance,
                                                              healthCheck: entry.healthCheck, sendProxyProtocol: entry.sendProxyProtocol, tls: entry.tls,
                                                              sources: entry.sources)
            }
        }
        guard c.contains(key("listeners")) else { throw DecodingError.keyNotFound(key("listeners"), .init(codingPath: c.codingPath, debugDescription: "")) }
        let listeners = try c.decode([ListenerEntry].self, forKey: key("listeners"))
        if listeners.isEmpty { throw fail("listeners", "at least one listener is needed") }
        var names: Set<String> = []
        for (i, l) in listeners.enumerated() where !names.insert(l.value.name).inserted {
            throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key("listeners"), AnyCodingKey(intValue: i), key("name")],
                                                    debugDescription: "duplicate listener name '\(l.value.name)'"))
        }
        for (i, l) in listeners.enumerated() {
            if let pool = l.value.pool, config.pools[pool] == nil {
                throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key("listeners"), AnyCodingKey(intValue: i), key("pool")],
                                                        debugDescription: "no pool named '\(pool)' (pools: \(config.pools.keys.sorted().joined(separator: ", ")))"))
            }
        }
        config.listeners = listeners.map(\.value)
        // A TLS recv leaves a whole record's room in its buffer (`Worker.tlsDecryptHeadroom`).
        if config.bufferSize < 32 * 1024, listeners.contains(where: { $0.value.tls != nil || $0.value.upstreamTLS != nil })
            || config.pools.values.contains(where: { $0.tls != nil }) {
            throw fail("buffer_size", "TLS needs buffer_size of at least 32KiB")
        }
    }
}

private struct ACLSection: Decodable {
    var rules: [DestinationACL.Rule] = []

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["allow", "deny"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        // deny first, then allow: the same order as --deny / --allow.
        for action in [DestinationACL.Action.deny, .allow] {
            let k = AnyCodingKey(stringValue: action.rawValue)
            guard c.contains(k) else { continue }
            var list = try c.nestedUnkeyedContainer(forKey: k)
            while !list.isAtEnd {
                let index = list.currentIndex
                let text = try list.decode(String.self)
                switch DestinationACL.parseRule(action, text) {
                case .success(let rule): rules.append(rule)
                case .failure(let e):
                    throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [k, AnyCodingKey(intValue: index)], debugDescription: e.description))
                }
            }
        }
    }
}

private struct LogSection: Decodable {
    var level = "info"
    var accessLog = true

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["level", "access_log"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        if let l = try c.decodeIfPresent(String.self, forKey: AnyCodingKey(stringValue: "level")) {
            let levels = ["trace", "debug", "info", "notice", "warning", "error", "critical"]
            guard levels.contains(l) else {
                throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [AnyCodingKey(stringValue: "level")],
                                                        debugDescription: "expected one of \(levels.joined(separator: ", ")), got '\(l)'"))
            }
            level = l
        }
        accessLog = try c.decodeIfPresent(Bool.self, forKey: AnyCodingKey(stringValue: "access_log")) ?? true
    }
}

private struct ListenerEntry: Decodable {
    var value: ConfigFile.Listener

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["name", "listen", "mode", "upstream", "pool", "auth", "accept_proxy_protocol", "proxy_protocol_from", "send_proxy_protocol",
                                       "splice", "connect_timeout", "idle_timeout", "dead_peer_timeout", "handshake_timeout",
                                       "max_connections", "tls", "upstream_tls", "source"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        func key(_ s: String) -> AnyCodingKey { AnyCodingKey(stringValue: s) }
        func fail(_ k: String, _ message: String) -> DecodingError {
            .dataCorrupted(.init(codingPath: c.codingPath + [key(k)], debugDescription: message))
        }
        let modeText = try c.decode(String.self, forKey: key("mode"))
        guard let mode = ListenerMode(rawValue: modeText) else {
            throw fail("mode", "expected one of \(ListenerMode.allCases.map(\.rawValue).joined(separator: ", ")), got '\(modeText)'")
        }
        let listenText = try c.decode(String.self, forKey: key("listen"))
        let listen: SocketAddress
        do { listen = try SocketAddress.resolve(listenText, passive: true) } catch { throw fail("listen", error.description) }
        let name = try c.decodeIfPresent(String.self, forKey: key("name")) ?? "\(mode.rawValue)-\(listenText)"
        var upstream: SocketAddress? = nil
        let pool = try c.decodeIfPresent(String.self, forKey: key("pool"))
        if let text = try c.decodeIfPresent(String.self, forKey: key("upstream")) {
            guard mode == .forward else { throw fail("upstream", "only forward listeners have an upstream") }
            guard pool == nil else { throw fail("upstream", "give upstream or pool, not both") }
            do { upstream = try SocketAddress.resolve(text) } catch { throw fail("upstream", error.description) }
        } else if pool != nil {
            guard mode == .forward else { throw fail("pool", "only forward listeners use a pool") }
        } else if mode == .forward {
            throw DecodingError.keyNotFound(key("upstream"), .init(codingPath: c.codingPath, debugDescription: "a forward listener needs upstream or pool"))
        }
        var requireAuthentication = true
        if let auth = try c.decodeIfPresent(String.self, forKey: key("auth")) {
            guard mode == .socks5 || mode == .httpConnect else { throw fail("auth", "only socks5 and http_connect listeners authenticate") }
            guard auth == "password" || auth == "none" else { throw fail("auth", "expected password or none, got '\(auth)'") }
            requireAuthentication = auth == "password"
        }
        value = ConfigFile.Listener(name: name, listen: listen, listenText: listenText, mode: mode, upstream: upstream, pool: pool,
                                    requireAuthentication: requireAuthentication)
        if let accept = try c.decodeIfPresent(Bool.self, forKey: key("accept_proxy_protocol")) {
            guard mode != .admin else { throw fail("accept_proxy_protocol", "admin listeners do not take PROXY headers") }
            value.acceptProxyProtocol = accept
        }
        if let sources = try c.decodeIfPresent([String].self, forKey: key("proxy_protocol_from")) {
            guard value.acceptProxyProtocol else { throw fail("proxy_protocol_from", "only with accept_proxy_protocol: true") }
            for (k, text) in sources.enumerated() {
                guard let cidr = CIDR(text) else {
                    throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [key("proxy_protocol_from"), AnyCodingKey(intValue: k)],
                                                            debugDescription: "expected an address or CIDR such as 10.0.0.0/8, got '\(text)'"))
                }
                value.proxyProtocolFrom.append(cidr)
            }
        }
        if value.acceptProxyProtocol && value.proxyProtocolFrom.isEmpty {
            throw fail("accept_proxy_protocol", "needs proxy_protocol_from: [CIDR, …], the balancers allowed to send PROXY headers (anyone else could name any client)")
        }
        if mode != .admin {
            if let text = try c.decodeIfPresent(String.self, forKey: key("splice")) {
                guard let v = SpliceMode(rawValue: text) else { throw fail("splice", "expected auto, always or never, got '\(text)'") }
                value.splice = v
            }
            func duration(_ k: String, allowNone: Bool = false) throws -> UInt64?? {
                guard let text = try c.decodeIfPresent(String.self, forKey: key(k)) else { return nil }
                if allowNone && (text == "none" || text == "off") { return .some(nil) }
                guard let ns = DurationText.parse(text), ns > 0 else {
                    throw fail(k, "expected a duration such as 500ms, 5s, 2m or 1h\(allowNone ? " (or none)" : ""), got '\(text)'")
                }
                return .some(ns)
            }
            value.connectTimeoutNanoseconds = try duration("connect_timeout") ?? nil
            value.idleTimeoutNanoseconds = try duration("idle_timeout", allowNone: true)
            value.deadPeerTimeoutNanoseconds = try duration("dead_peer_timeout", allowNone: true)
            value.handshakeTimeoutNanoseconds = try duration("handshake_timeout") ?? nil
            if let m = try c.decodeIfPresent(Int.self, forKey: key("max_connections")) {
                guard m >= 1 else { throw fail("max_connections", "must be at least 1") }
                value.maxConnections = m
            }
        } else {
            for k in ["splice", "connect_timeout", "idle_timeout", "dead_peer_timeout", "handshake_timeout", "max_connections"] where c.contains(key(k)) {
                throw fail(k, "admin listeners have no \(k)")
            }
        }
        value.tls = try c.decodeIfPresent(TLSServerSection.self, forKey: key("tls"))?.context
        if c.contains(key("upstream_tls")) {
            guard mode == .forward && upstream != nil else { throw fail("upstream_tls", "only forward listeners with an upstream (a pool has its own upstream_tls)") }
            value.upstreamTLS = try c.decode(TLSClientSection.self, forKey: key("upstream_tls")).context
        }
        if c.contains(key("source")) {
            guard mode == .forward && upstream != nil else { throw fail("source", "only forward listeners with an upstream (a pool has its own source)") }
            value.upstreamSources = try decodeSources(c, key("source"))
        }
        if let send = try c.decodeIfPresent(String.self, forKey: key("send_proxy_protocol")) {
            guard mode == .forward else { throw fail("send_proxy_protocol", "only forward listeners send PROXY headers upstream") }
            guard send == "off" || ProxyProtocol.Version(rawValue: send) != nil else { throw fail("send_proxy_protocol", "expected v1, v2 or off, got '\(send)'") }
            value.sendProxyProtocol = ProxyProtocol.Version(rawValue: send)
        }
    }
}

/// `LOW-HIGH` (or one port) from operator text.
public enum PortRange {
    public static func parse(_ text: String) -> ClosedRange<UInt16>? {
        let parts = text.split(separator: "-", omittingEmptySubsequences: false).map { String($0.filter { $0 != " " }) }
        guard parts.count == 1 || parts.count == 2, let low = UInt16(parts[0]), let high = UInt16(parts.last!), low > 0, low <= high else { return nil }
        return low...high
    }
}
