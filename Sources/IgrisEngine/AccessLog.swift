import Logging

/// One closed connection, as the access log records it.
public struct AccessRecord: Sendable {
    public var listener: String
    public var client: String
    public var destination: String
    public var user: String
    public var bytesUp: UInt64
    public var bytesDown: UInt64
    /// Seconds, to the millisecond.
    public var duration: Double
    public var reason: String
    /// TLS connections: version/cipher (the client side's, else the upstream's).
    public var tls: String? = nil

    public init(listener: String, client: String, destination: String, user: String, bytesUp: UInt64, bytesDown: UInt64,
                duration: Double, reason: String, tls: String? = nil) {
        self.listener = listener
        self.client = client
        self.destination = destination
        self.user = user
        self.bytesUp = bytesUp
        self.bytesDown = bytesDown
        self.duration = duration
        self.reason = reason
        self.tls = tls
    }
}

/// Where one worker's access-log lines go. Called only on that worker's thread: `record`
/// per closed connection, `flush` once per loop turn (if anything was recorded) and when
/// the worker ends, so a sink may buffer a turn's lines into one write and none is lost
/// on drain or SIGTERM.
public protocol AccessLogSink: AnyObject {
    func record(_ r: AccessRecord)
    func flush()
}

/// The sink without a buffer of its own: a swift-log `Logger` (`igris.access`), one event per
/// line (in-process servers; `igris serve` buffers, see `LogfmtAccessLog`).
final class LoggerAccessLog: AccessLogSink {
    let logger: Logger

    init(_ logger: Logger) { self.logger = logger }

    func record(_ r: AccessRecord) {
        logger.info("closed", metadata: [
            "listener": "\(r.listener)", "client": "\(r.client)", "destination": "\(r.destination)", "user": "\(r.user)",
            "bytes_up": "\(r.bytesUp)", "bytes_down": "\(r.bytesDown)", "duration": "\(r.duration)s", "reason": "\(r.reason)",
            "tls": "\(r.tls ?? "-")",
        ])
    }

    func flush() {}
}
