import ArgumentParser
import Glibc
import IgrisEngine
import IgrisNegotiation
import IgrisOperations
import IgrisPolicy
import IgrisTLS
import Logging
import Synchronization

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the gateway: port forwards, SOCKS5 and HTTP CONNECT listeners.",
        discussion: """
            The n-th --listen forwards to the n-th --upstream. --socks5 and --http-connect \
            listeners let clients choose the destination: they need --users FILE (or --no-auth), \
            and reach only what the destination ACL allows (loopback, private, link-local, special-purpose \
            ranges and this host's own addresses \
            are denied unless an --allow rule says otherwise; --deny rules are checked \
            first, then --allow, then the built-in deny list). SIGINT/SIGTERM stop accepting \
            and let open connections finish for up to --drain-timeout; a second signal aborts them.
            """
    )

    @Option(name: [.customShort("c"), .customLong("config")], help: "Configuration file (YAML); replaces the listener flags.")
    var configFile: String?

    @Option(name: .customLong("admin"), help: "Admin endpoint (GET /metrics, /healthz, /readyz), HOST:PORT.")
    var admin: String?

    @Option(name: .customLong("listen"), help: "Address to accept on, HOST:PORT or [V6]:PORT (repeatable).")
    var listen: [String] = []

    @Option(name: .customLong("upstream"), help: "Where the matching --listen forwards to, HOST:PORT (repeatable).")
    var upstream: [String] = []

    @Option(name: .customLong("socks5"), help: "SOCKS5 listener address, HOST:PORT (repeatable).")
    var socks5: [String] = []

    @Option(name: .customLong("http-connect"), help: "HTTP proxy listener address (CONNECT tunnels and plain http:// requests), HOST:PORT (repeatable).")
    var httpConnect: [String] = []

    @Option(name: .customLong("tls-cert"), help: "TLS on every listener given by flags: certificate chain (PEM), with --tls-key.")
    var tlsCertificate: String?

    @Option(name: .customLong("tls-key"), help: "The private key (PEM) of --tls-cert.")
    var tlsKey: String?

    @Option(name: .customLong("tls-client-ca"), help: "Require client certificates signed by this CA bundle (PEM); a certificate's CN names its user.")
    var tlsClientCA: String?

    @Option(name: .customLong("tls-min-version"), help: "Lowest TLS version accepted: 1.2 (default) or 1.3.")
    var tlsMinVersion: String?

    @Flag(name: .customLong("upstream-tls"), help: "TLS toward each --upstream, its certificate verified against the system's CAs.")
    var upstreamTLS = false

    @Option(name: .customLong("upstream-tls-ca"), help: "TLS toward each --upstream, verified against this CA bundle (PEM).")
    var upstreamTLSCA: String?

    @Option(name: .customLong("upstream-source"),
            help: "Connect to each --upstream from this local address, in turn with the others given (repeatable; each adds about 28,000 ports toward a server).")
    var upstreamSource: [String] = []

    @Option(name: .customLong("users"), help: "Users file (YAML, argon2id hashes from `igris passwd`) for --socks5/--http-connect.")
    var usersFile: String?

    @Flag(name: .customLong("no-auth"), help: "Let --socks5/--http-connect clients in without a username and password.")
    var noAuth = false

    @Option(name: .customLong("allow"), help: "Destination ACL: allow CIDR[:PORTS], e.g. 127.0.0.1/32:8000 (repeatable).")
    var allow: [String] = []

    @Option(name: .customLong("deny"), help: "Destination ACL: deny CIDR[:PORTS], checked before --allow (repeatable).")
    var deny: [String] = []

    @Option(name: .customLong("handshake-timeout"), help: "SOCKS5 / HTTP CONNECT: the handshake must complete within this.")
    var handshakeTimeout: DurationArgument = DurationArgument(argument: "10s")!

    @Option(help: "Worker threads, one event loop each (default: online CPUs).")
    var workers: Int = Syscall.onlineCPUs()

    @Option(help: "I/O backend: auto, io_uring or epoll.")
    var backend: BackendChoice = .auto

    @Option(name: .customLong("connect-timeout"), help: "Upstream connect timeout (e.g. 5s, 500ms).")
    var connectTimeout: DurationArgument = DurationArgument(argument: "5s")!

    @Option(name: .customLong("idle-timeout"), help: "Close a bridge with no traffic for this long (default: never).")
    var idleTimeout: DurationArgument?

    @Option(name: .customLong("dead-peer-timeout"),
            help: "Close bridges whose peer vanished without FIN or RST (keepalive + TCP_USER_TIMEOUT) within about this long; 0: never.")
    var deadPeerTimeout: DurationArgument = DurationArgument(argument: "2m")!

    @Option(name: .customLong("drain-timeout"), help: "On SIGTERM, how long open bridges may finish.")
    var drainTimeout: DurationArgument = DurationArgument(argument: "30s")!

    @Option(name: .customLong("drain-grace"),
            help: "On SIGTERM, how long accepting goes on after /readyz turns 503, so a balancer's checks notice first (default 0).")
    var drainGrace: DurationArgument?

    @Option(name: .customLong("handoff-socket"),
            help: "Unix socket through which a successor (--takeover, or SIGUSR2) takes the listeners over.")
    var handoffSocket: String?

    @Flag(name: .customLong("takeover"),
          help: "Take the listeners over from the igris running at the hand-off socket; it drains once this one accepts.")
    var takeover = false

    @Option(name: .customLong("max-connections"), help: "Bridged connections open at once, all workers together (default: what RLIMIT_NOFILE allows, at most 65536).")
    var maxConnections: Int?

    @Option(name: .customLong("max-connections-per-source"),
            help: "Connections open at once from one client address (an IPv6 /64), 0 for no limit (default: a quarter of --max-connections). Balancers in proxy_protocol_from are exempt.")
    var maxConnectionsPerSource: Int?

    @Option(name: .customLong("udp-relay-ports"),
            help: "Ports SOCKS5 UDP ASSOCIATE relays bind, LOW-HIGH, so a firewall can open exactly them (default: any ephemeral port).")
    var udpRelayPorts: String?

    @Option(name: .customLong("max-handshakes"),
            help: "Connections still in their SOCKS5/HTTP CONNECT/PROXY handshake at once, 0 for no limit (default: half of --max-connections).")
    var maxHandshakes: Int?

    @Option(name: .customLong("max-handshakes-per-source"),
            help: "The same, from one client address, 0 for no limit (default: a quarter of --max-connections, at most 64).")
    var maxHandshakesPerSource: Int?

    @Option(name: .customLong("buffer-size"), help: "Bytes per pooled buffer.")
    var bufferSize: Int = 64 * 1024

    @Option(name: .customLong("buffer-memory"),
            help: "Memory for pooled buffers, all workers together (e.g. 256MiB); the pool grows to it on demand and shrinks when idle. Default: 4KiB per --max-connections, 16MiB per worker at least, 1GiB at most.")
    var bufferMemory: String?

    @Option(name: .customLong("buffers"), help: "Pooled buffers per worker at most (a power of two); instead of --buffer-memory.")
    var buffers: Int?

    @Option(help: "Zero-copy splice path: auto (switch bulk directions), always, never.")
    var splice: SpliceMode = .auto

    @Option(name: .customLong("splice-threshold"), help: "auto: consecutive full-buffer reads that move a direction to splice.")
    var spliceThreshold: Int = 4

    @Option(name: .customLong("pipe-size"), help: "Bytes per splice pipe (capped by fs.pipe-max-size).")
    var pipeSize: Int = 1 << 20

    @Option(name: .customLong("max-pipes"), help: "Splice pipes per worker at most; past it a direction stays on copy.")
    var maxPipes: Int = 4096

    @Option(name: .customLong("send-zc"), help: "io_uring: send chunks of at least this many bytes with IORING_OP_SEND_ZC (default: off; see Benchmarks/README.md).")
    var sendZeroCopy: Int?

    @Option(name: .customLong("listen-backlog"),
            help: "Each listening socket's backlog, one per worker (capped by net.core.somaxconn).")
    var listenBacklog: Int32 = 1024

    @Option(name: .customLong("busy-poll"),
            help: "After handling completions, each worker polls for the next for up to this long (e.g. 50us) before sleeping: lower round-trip latency for at most that much CPU per wake-up (default: off).")
    var busyPoll: DurationArgument?

    @Flag(name: .customLong("direct-descriptors"),
          help: "io_uring: bridged sockets move to the ring's fixed-file table, so bridges are not bounded by the descriptor limit (copy path only; see Kernel-notes).")
    var directDescriptors = false

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    @Flag(name: .customLong("no-access-log"), help: "Do not log a line per closed connection.")
    var noAccessLog = false

    func validate() throws {
        if listen.count != upstream.count {
            throw ValidationError("\(listen.count) --listen but \(upstream.count) --upstream: each --listen needs its own --upstream")
        }
        if workers < 1 || workers > 1024 { throw ValidationError("--workers must be between 1 and 1024") }
        if let maxConnections, maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if let udpRelayPorts, PortRange.parse(udpRelayPorts) == nil {
            throw ValidationError("--udp-relay-ports: expected a port range such as 40000-40999, got '\(udpRelayPorts)'")
        }
        for (flag, value) in [("--max-connections-per-source", maxConnectionsPerSource), ("--max-handshakes", maxHandshakes),
                              ("--max-handshakes-per-source", maxHandshakesPerSource)] {
            if let value, value < 0 { throw ValidationError("\(flag) must be 0 (no limit) or more") }
        }
        if bufferSize < 1024 || bufferSize > 1 << 20 { throw ValidationError("--buffer-size must be between 1024 and 1048576") }
        if let buffers, buffers < 2 || buffers > 32768 || buffers & (buffers - 1) != 0 {
            throw ValidationError("--buffers must be a power of two between 2 and 32768")
        }
        if let bufferMemory {
            guard buffers == nil else { throw ValidationError("--buffers and --buffer-memory contradict each other: choose one") }
            guard let bytes = ByteSize.parse(bufferMemory), bytes >= UInt64(bufferSize * 2) else {
                throw ValidationError("--buffer-memory must be a size such as 64MiB or 1GiB, at least two buffers, got '\(bufferMemory)'")
            }
        }
        if listenBacklog < 1 || listenBacklog > 65535 { throw ValidationError("--listen-backlog must be between 1 and 65535") }
        if let busyPoll, busyPoll.nanoseconds > ServerConfiguration.busyPollLimitNanoseconds {
            throw ValidationError("--busy-poll must be at most 1s")
        }
        if spliceThreshold < 1 || spliceThreshold > 255 { throw ValidationError("--splice-threshold must be between 1 and 255") }
        if pipeSize < 4096 || pipeSize > 1 << 30 { throw ValidationError("--pipe-size must be between 4096 and 1073741824") }
        if maxPipes < 0 { throw ValidationError("--max-pipes must be 0 or more") }
        if connectTimeout.nanoseconds == 0 { throw ValidationError("--connect-timeout must be greater than 0") }
        if handshakeTimeout.nanoseconds == 0 { throw ValidationError("--handshake-timeout must be greater than 0") }
        try validateTLSFlags()
        if noAuth && usersFile != nil { throw ValidationError("--no-auth and --users contradict each other: choose one") }
        if let handoffSocket, !ListenerHandoff.isValidPath(handoffSocket) {
            throw ValidationError("--handoff-socket must be an absolute path shorter than 108 bytes")
        }
        if (socks5.isEmpty && httpConnect.isEmpty) && (noAuth || usersFile != nil || !allow.isEmpty || !deny.isEmpty) {
            throw ValidationError("--users, --no-auth, --allow and --deny apply to --socks5/--http-connect listeners, and none is given")
        }
    }

    func run() throws {
        if let configFile {
            guard listen.isEmpty && socks5.isEmpty && httpConnect.isEmpty && admin == nil && usersFile == nil && !noAuth
                    && allow.isEmpty && deny.isEmpty else {
                throw ValidationError("--config replaces --listen/--socks5/--http-connect/--admin/--users/--no-auth/--allow/--deny: put them in the file")
            }
            let file: ConfigFile
            let policy: GatewayPolicy
            do {
                file = try ConfigFile.load(path: configFile)
                policy = try file.policy(configPath: configFile)
            } catch {
                throw CommandFailure(error.description)
            }
            let admins = file.listeners.filter { $0.mode == .admin }.map { AdminListener(name: $0.name, listen: $0.listen, tls: $0.tls) }
            let gateway = Gateway(policy: policy)
            let configuration: ServerConfiguration
            do { configuration = try file.serverConfiguration(gateway: gateway) } catch { throw CommandFailure(error.description) }
            try start(configuration: configuration, gateway: gateway, admins: admins,
                      logLevel: Logger.Level(rawValue: file.logLevel) ?? .info, configPath: configFile,
                      handoffPath: handoffSocket ?? file.handoffSocket,
                      drainGraceNanoseconds: drainGrace?.nanoseconds ?? file.drainGraceNanoseconds)
            return
        }
        // Checked here, not in validate(), so an unknown flag is reported first.
        if listen.isEmpty && socks5.isEmpty && httpConnect.isEmpty {
            throw ValidationError("nothing to listen on: give --listen HOST:PORT --upstream HOST:PORT, --socks5 HOST:PORT or --http-connect HOST:PORT")
        }
        if !(socks5.isEmpty && httpConnect.isEmpty) && !noAuth && usersFile == nil {
            throw ValidationError("--socks5/--http-connect need --users FILE, or --no-auth to let anyone in")
        }
        let gateway = Gateway(policy: try makePolicy())
        let rules = try commandLineRules(gateway: gateway)
        var configuration = ServerConfiguration(listeners: rules, workers: workers, backend: backend)
        configuration.accounts = gateway.policy.accounts
        configuration.connectTimeoutNanoseconds = connectTimeout.nanoseconds
        configuration.idleTimeoutNanoseconds = idleTimeout?.nanoseconds
        configuration.deadPeerTimeoutNanoseconds = deadPeerTimeout.nanoseconds == 0 ? nil : deadPeerTimeout.nanoseconds
        configuration.drainTimeoutNanoseconds = drainTimeout.nanoseconds
        configuration.directDescriptors = directDescriptors
        configuration.listenBacklog = listenBacklog
        configuration.busyPollNanoseconds = busyPoll?.nanoseconds ?? 0
        let maxConnections = self.maxConnections ?? Server.defaultMaxConnections(
            workers: workers, listeners: rules.count, direct: Server.usesDirectDescriptors(directDescriptors, backend: backend))
        configuration.maxConnections = maxConnections
        configuration.maxConnectionsGiven = self.maxConnections != nil
        configuration.sourceLimits = SourceLimits.Settings.resolved(maxConnections: maxConnections, perSource: maxConnectionsPerSource,
                                                                    handshakes: maxHandshakes, handshakesPerSource: maxHandshakesPerSource)
        configuration.udpRelayPorts = udpRelayPorts.flatMap(PortRange.parse)
        let memory = bufferMemory.flatMap { ByteSize.parse($0) }.map { Int($0) }
            ?? BackendConfiguration.defaultBufferMemory(maxConnections: maxConnections, workers: workers)
        let count = buffers ?? BackendConfiguration.bufferCount(memory: memory, bufferSize: bufferSize, workers: workers)
        configuration.buffers = BackendConfiguration(bufferSize: bufferSize, bufferCount: count, zeroCopySendThreshold: sendZeroCopy)
        configuration.splice = splice
        configuration.spliceThreshold = spliceThreshold
        configuration.pipeSize = pipeSize
        configuration.maxPipes = maxPipes
        configuration.accessLog = !noAccessLog
        var admins: [AdminListener] = []
        if let admin {
            do { admins.append(AdminListener(name: "admin", listen: try SocketAddress.resolve(admin, passive: true), tls: nil)) } catch { throw CommandFailure(error.description) }
        }
        try start(configuration: configuration, gateway: gateway, admins: admins, logLevel: logLevel, configPath: nil,
                  handoffPath: handoffSocket, drainGraceNanoseconds: drainGrace?.nanoseconds ?? 0)
    }

    /// Takes the listeners over (--takeover), binds the rest, starts the workers and admin
    /// endpoints, then waits for signals until drained. Everything that can fail happens
    /// before a worker accepts: a successor that fails leaves its predecessor as it was.
    /// An admin endpoint to start: HTTP, or HTTPS with `tls:` in the file.
    struct AdminListener {
        var name: String
        var listen: SocketAddress
        var tls: TLSServerContext?
    }

    private func start(configuration: ServerConfiguration, gateway: Gateway, admins: [AdminListener], logLevel: Logger.Level,
                       configPath: String?, handoffPath: String?, drainGraceNanoseconds: UInt64) throws {
        defer { gateway.shutdown() }
        var configuration = configuration
        // Access lines are info events: buffered per worker turn (one write for many), and
        // not written at all above info, as with any info event.
        if logLevel <= .info { configuration.accessLogSink = { LogfmtAccessLog() } } else { configuration.accessLog = false }
        LoggingSystem.bootstrap { label in
            if label == "igris.access" { return LogfmtLogHandler(label: "access", level: logLevel) }
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = logLevel
            return handler
        }
        let logger = Logger(label: "igris")
        let rules = configuration.listeners
        let workers = configuration.workers

        // Signals go to the signal thread only: block them before any worker starts.
        let signals = SignalWaiter(signals: [SIGINT, SIGTERM, SIGHUP, SIGUSR2])
        // This host's own addresses join the default deny list; they change (DHCP): re-read.
        HostAddresses.shared.startRefreshing()
        signal(SIGPIPE, SIG_IGN)

        var session: HandoffSession? = nil
        if takeover {
            guard let handoffPath else {
                throw CommandFailure("--takeover needs the hand-off socket: handoff_socket in the file, or --handoff-socket")
            }
            do { session = try HandoffSession(path: handoffPath) } catch { throw CommandFailure(error.description) }
        }
        func fail(_ message: String) -> CommandFailure {
            session?.abandon()
            return CommandFailure(message)
        }
        let handoff: HandoffListener?
        do {
            // First: a second igris started by mistake (no --takeover) is told so here.
            handoff = try handoffPath.map { path throws(HandoffError) in try HandoffListener(path: path, inherited: session?.sockets) }
        } catch {
            throw fail(error.description)
        }
        let server: Server
        var adminServers: [AdminServer] = []
        do {
            server = try Server(configuration: configuration, inherited: session?.sockets, logger: logger)
            for admin in admins {
                adminServers.append(try AdminServer(listen: admin.listen, metrics: MetricsRenderer(server: server, gateway: gateway),
                                                    inherited: session?.sockets, tls: admin.tls))
            }
        } catch {
            throw fail(error.description)
        }
        logger.info("backend selected", metadata: ["backend": "\(server.backend)", "why": "\(server.backendReason)"])
        if configuration.directDescriptors {
            if server.usesDirectDescriptors {
                logger.info("direct descriptors: bridges move to the rings' fixed-file tables", metadata: ["max_connections": "\(configuration.maxConnections)"])
            } else {
                logger.warning("direct descriptors need io_uring: off on \(server.backend)")
            }
        }
        // Only a limit the operator set can be too high: the default follows RLIMIT_NOFILE.
        if configuration.maxConnectionsGiven, let warning = server.descriptorWarning { logger.warning("\(warning)") }
        do { try server.start() } catch { throw fail(error.description) }
        for (a, admin) in zip(adminServers, admins) {
            a.start()
            logger.info("listening", metadata: ["mode": "admin", "name": "\(admin.name)", "listen": "\(a.address)", "tls": "\(admin.tls != nil)"])
        }
        for (rule, address) in zip(rules, server.listenAddresses) {
            if let pool = rule.pool {
                logger.info("forwarding", metadata: [
                    "name": "\(rule.name)", "listen": "\(address)", "pool": "\(pool.name)",
                    "upstream": "\(pool.servers.map(\.description).joined(separator: ","))", "balance": "\(pool.balance.rawValue)",
                    "workers": "\(workers)",
                ])
            } else {
                logger.info("listening", metadata: [
                    "mode": "\(rule.modeName)", "name": "\(rule.name)", "listen": "\(address)", "workers": "\(workers)",
                ])
            }
        }
        if let session {
            // Listeners the new configuration dropped: the predecessor closes them as it drains.
            let dropped = session.sockets.remaining.filter { $0.role == .listener }.map(\.address)
            session.sockets.closeUnclaimed()
            do {
                try session.ready()
                logger.notice("took the listeners over", metadata: [
                    "predecessor": "\(session.predecessor)", "dropped": "\(Set(dropped).sorted().joined(separator: ","))",
                ])
            } catch {
                logger.warning("\(error.description)")
            }
        }
        let lifecycle = Lifecycle(server: server, admins: adminServers, logger: logger, handoffPath: handoffPath,
                                  drainGraceNanoseconds: drainGraceNanoseconds)
        if let handoff { lifecycle.serveHandoffs(handoff) }
        let usersPath = usersFile
        // Without a file, a reload rebuilds the flags' listeners: new certificates take effect.
        let flags = self
        Lifecycle.notifyReady(successor: session != nil)
        signals.start { _, signal in
            switch signal {
            case SIGHUP:
                lifecycle.whileListenersStay {
                    Self.reload(server: server, gateway: gateway, configPath: configPath, usersPath: usersPath, logger: logger)
                    if configPath == nil && flags.tlsCertificate != nil { flags.reloadCommandLineTLS(server: server, gateway: gateway, logger: logger) }
                }
            case SIGUSR2:
                lifecycle.upgrade()
            default:
                lifecycle.stop(signal: signal)
            }
        }
        server.wait()
        for a in adminServers { a.stop() }
        logger.info("stopped", metadata: [
            "accepted": "\(server.total(.acceptedTotal))",
            "aborted_at_deadline": "\(server.total(.drainAborted))",
        ])
    }
}

extension Serve {
    /// SIGHUP: re-read the users file and the configuration file. Users: removed and expired
    /// users' tunnels end, changed limits apply. Listeners and pools that changed take
    /// effect; open connections are untouched. A file that does not validate is logged and
    /// ignored. Global settings and admin listeners stay as started.
    static func reload(server: Server, gateway: Gateway, configPath: String?, usersPath: String?, logger: Logger) {
        HostAddresses.shared.refresh()
        guard let configPath else {
            reloadUsers(server: server, gateway: gateway, path: usersPath, logger: logger)
            return
        }
        do {
            let file = try ConfigFile.load(path: configPath)
            reloadUsers(server: server, gateway: gateway, path: file.usersPath(configPath: configPath), logger: logger)
            let checked = try file.policy(configPath: configPath)
            var policy = gateway.policy
            policy.acl = checked.acl
            let rules = try file.listenerRules(gateway: gateway)
            let summary = try server.reload(listeners: rules)
            gateway.update(policy)
            logger.notice("configuration reloaded", metadata: [
                "file": "\(configPath)", "added": "\(summary.added.joined(separator: ","))",
                "removed": "\(summary.removed.joined(separator: ","))", "kept": "\(summary.kept.joined(separator: ","))",
            ])
        } catch {
            logger.error("reload rejected; the running configuration stays", metadata: ["file": "\(configPath)", "error": "\(error)"])
        }
    }

    /// The users file again, into the running authenticator (see `Authenticator.reload`).
    static func reloadUsers(server: Server, gateway: Gateway, path: String?, logger: Logger) {
        guard let path else { return }
        guard let authenticator = gateway.policy.authenticator else {
            logger.warning("users file not reloaded: igris started without one (restart to add it)", metadata: ["file": "\(path)"])
            return
        }
        do {
            let (directory, changes) = authenticator.reload(try UserDirectory.load(path: path))
            server.updateAccounts(directory.accounts)
            logger.notice("users reloaded", metadata: [
                "file": "\(path)", "users": "\(directory.accounts.filter { !$0.isRemoved }.count)",
                "added": "\(changes.added.joined(separator: ","))", "removed": "\(changes.removed.joined(separator: ","))",
                "new_password": "\(changes.newPassword.joined(separator: ","))",
            ])
        } catch {
            logger.error("users file reload rejected; the running users stay", metadata: ["error": "\(error)"])
        }
    }

    /// Users file and ACL rules; every error names what is wrong.
    func makePolicy() throws -> GatewayPolicy {
        var aclRules: [DestinationACL.Rule] = []
        for (action, texts) in [(DestinationACL.Action.deny, deny), (.allow, allow)] {
            for text in texts {
                switch DestinationACL.parseRule(action, text) {
                case .success(let rule): aclRules.append(rule)
                case .failure(let error): throw ValidationError(error.description)
                }
            }
        }
        var authenticator: Authenticator? = nil
        if let usersFile {
            do {
                authenticator = try Authenticator(directory: try UserDirectory.load(path: usersFile))
            } catch let error as YAMLFileError {
                throw CommandFailure("users file \(error)")
            } catch {
                throw CommandFailure("\(error)")
            }
        }
        return GatewayPolicy(acl: DestinationACL(rules: aclRules), authenticator: authenticator)
    }
}

extension BackendChoice: ExpressibleByArgument {}
extension SpliceMode: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
