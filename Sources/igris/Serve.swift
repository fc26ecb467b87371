import ArgumentParser
import Glibc
import IgrisEngine
import Logging

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the gateway: forward each --listen address to its --upstream.",
        discussion: """
            The n-th --listen forwards to the n-th --upstream. SIGINT/SIGTERM stop accepting \
            and let open connections finish for up to --drain-timeout; a second signal aborts them.
            """
    )

    @Option(name: .customLong("listen"), help: "Address to accept on, HOST:PORT or [V6]:PORT (repeatable).")
    var listen: [String] = []

    @Option(name: .customLong("upstream"), help: "Where the matching --listen forwards to, HOST:PORT (repeatable).")
    var upstream: [String] = []

    @Option(help: "Worker threads, one event loop each (default: online CPUs).")
    var workers: Int = Syscall.onlineCPUs()

    @Option(help: "I/O backend: auto, io_uring or epoll.")
    var backend: BackendChoice = .auto

    @Option(name: .customLong("connect-timeout"), help: "Upstream connect timeout (e.g. 5s, 500ms).")
    var connectTimeout: DurationArgument = DurationArgument(argument: "5s")!

    @Option(name: .customLong("idle-timeout"), help: "Close a bridge with no traffic for this long (default: never).")
    var idleTimeout: DurationArgument?

    @Option(name: .customLong("drain-timeout"), help: "On SIGTERM, how long open bridges may finish.")
    var drainTimeout: DurationArgument = DurationArgument(argument: "30s")!

    @Option(name: .customLong("max-connections"), help: "Bridged connections open at once, all workers together.")
    var maxConnections: Int = 65536

    @Option(name: .customLong("buffer-size"), help: "Bytes per pooled buffer.")
    var bufferSize: Int = 64 * 1024

    @Option(name: .customLong("buffers"), help: "Pooled buffers per worker (a power of two).")
    var buffers: Int = 256

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

    @Option(name: .customLong("log-level"), help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    func validate() throws {
        if listen.count != upstream.count {
            throw ValidationError("\(listen.count) --listen but \(upstream.count) --upstream: each --listen needs its own --upstream")
        }
        if workers < 1 || workers > 1024 { throw ValidationError("--workers must be between 1 and 1024") }
        if maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if bufferSize < 1024 || bufferSize > 1 << 20 { throw ValidationError("--buffer-size must be between 1024 and 1048576") }
        if buffers < 2 || buffers > 32768 || buffers & (buffers - 1) != 0 {
            throw ValidationError("--buffers must be a power of two between 2 and 32768")
        }
        if spliceThreshold < 1 || spliceThreshold > 255 { throw ValidationError("--splice-threshold must be between 1 and 255") }
        if pipeSize < 4096 || pipeSize > 1 << 30 { throw ValidationError("--pipe-size must be between 4096 and 1073741824") }
        if maxPipes < 0 { throw ValidationError("--max-pipes must be 0 or more") }
        if connectTimeout.nanoseconds == 0 { throw ValidationError("--connect-timeout must be greater than 0") }
    }

    func run() throws {
        // Checked here, not in validate(), so an unknown flag is reported first.
        if listen.isEmpty { throw ValidationError("no --listen address given (e.g. --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000)") }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = logLevel
            return handler
        }
        let logger = Logger(label: "igris")

        var forwards: [ForwardRule] = []
        for (l, u) in zip(listen, upstream) {
            do {
                forwards.append(ForwardRule(listen: try SocketAddress.resolve(l, passive: true),
                                            upstream: try SocketAddress.resolve(u)))
            } catch {
                throw CommandFailure(error.description)
            }
        }
        var configuration = ServerConfiguration(forwards: forwards, workers: workers, backend: backend)
        configuration.connectTimeoutNanoseconds = connectTimeout.nanoseconds
        configuration.idleTimeoutNanoseconds = idleTimeout?.nanoseconds
        configuration.drainTimeoutNanoseconds = drainTimeout.nanoseconds
        configuration.maxConnections = maxConnections
        configuration.buffers = BackendConfiguration(bufferSize: bufferSize, bufferCount: buffers, zeroCopySendThreshold: sendZeroCopy)
        configuration.splice = splice
        configuration.spliceThreshold = spliceThreshold
        configuration.pipeSize = pipeSize
        configuration.maxPipes = maxPipes

        // Signals go to the signal thread only: block them before any worker starts.
        let signals = SignalWaiter(signals: [SIGINT, SIGTERM])
        signal(SIGPIPE, SIG_IGN)

        let server: Server
        do {
            server = try Server(configuration: configuration, logger: logger)
            logger.info("backend selected", metadata: ["backend": "\(server.backend)", "why": "\(server.backendReason)"])
            if let warning = server.descriptorWarning { logger.warning("\(warning)") }
            try server.start()
        } catch {
            throw CommandFailure(error.description)
        }
        for (rule, address) in zip(forwards, server.listenAddresses) {
            logger.info("forwarding", metadata: ["listen": "\(address)", "upstream": "\(rule.upstream)", "workers": "\(workers)"])
        }
        signals.start { count, signal in
            if count == 1 {
                logger.info("draining: accepting stopped, open connections may finish",
                            metadata: ["signal": "\(signal)", "deadline": "\(drainTimeout)", "active": "\(server.total(.activeConnections))"])
                server.beginDrain()
            } else {
                logger.warning("second signal: aborting open connections", metadata: ["signal": "\(signal)"])
                server.abort()
            }
        }
        server.wait()
        logger.info("stopped", metadata: [
            "accepted": "\(server.total(.acceptedTotal))",
            "aborted_at_deadline": "\(server.total(.drainAborted))",
        ])
    }
}

extension BackendChoice: ExpressibleByArgument {}
extension SpliceMode: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
