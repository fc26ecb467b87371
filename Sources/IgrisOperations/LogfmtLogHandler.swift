import Glibc
import IgrisEngine
import Logging

/// A swift-log handler that writes logfmt: `time=… level=… logger=… msg=… key=value …`,
/// one line per event, values quoted when they hold spaces, quotes or `=`. Used for the
/// access log (`igris.access`), which log shippers parse.
public struct LogfmtLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    private let label: String
    private let fd: Int32

    public init(label: String, level: Logger.Level, fd: Int32 = 2) {
        self.label = label
        logLevel = level
        self.fd = fd
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var line = "time=\(Self.timestamp()) level=\(event.level) logger=\(label) msg=\(Self.quote(event.message.description))"
        var all = metadata
        if let extra = event.metadata { all.merge(extra) { $1 } }
        for key in all.keys.sorted() {
            line += " \(key)=\(Self.quote(all[key]!.description))"
        }
        line += "\n"
        Self.writeAll(fd, Array(line.utf8))
    }

    /// Writes all of `bytes` (a short write is continued; an error gives up: a log must not
    /// stop the gateway).
    static func writeAll(_ fd: Int32, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + offset, raw.count - offset)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
                offset += n
            }
        }
    }

    public static func quote(_ value: String) -> String {
        guard value.isEmpty || value.contains(where: { $0 == " " || $0 == "\"" || $0 == "=" || $0.isNewline }) else { return value }
        // The same escapes as a Prometheus label value: backslash, double quote, LF, CR.
        return "\"" + MetricsText.escape(value) + "\""
    }

    /// RFC 3339 UTC with milliseconds.
    static func timestamp() -> String {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        var t = time_t(ts.tv_sec)
        var parts = tm()
        gmtime_r(&t, &parts)
        func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
        let ms = Int(ts.tv_nsec / 1_000_000)
        let msText = ms < 10 ? "00\(ms)" : ms < 100 ? "0\(ms)" : "\(ms)"
        return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)).\(msText)Z"
    }
}

/// `igris serve`'s access log: a worker's lines in logfmt (the same line `LogfmtLogHandler`
/// writes for `igris.access`), gathered in a buffer of its own and written once per loop turn
/// — one write for every connection that closed in it, not one each — or as soon as 64 KiB
/// are waiting. The worker flushes it when it ends, so drain and SIGTERM lose no line.
public final class LogfmtAccessLog: AccessLogSink {
    private let fd: Int32
    private var buffer: [UInt8] = []
    private static let flushAt = 65536

    public init(fd: Int32 = 2) {
        self.fd = fd
        buffer.reserveCapacity(Self.flushAt + 1024)
    }

    public func record(_ r: AccessRecord) {
        // Keys in the order LogfmtLogHandler sorts them.
        var line = "time=\(LogfmtLogHandler.timestamp()) level=info logger=access msg=closed"
        line += " bytes_down=\(r.bytesDown) bytes_up=\(r.bytesUp) client=\(LogfmtLogHandler.quote(r.client))"
        line += " destination=\(LogfmtLogHandler.quote(r.destination)) duration=\(r.duration)s listener=\(LogfmtLogHandler.quote(r.listener))"
        line += " reason=\(r.reason)"
        if let tls = r.tls { line += " tls=\(tls)" }
        line += " user=\(LogfmtLogHandler.quote(r.user))\n"
        buffer.append(contentsOf: line.utf8)
        if buffer.count >= Self.flushAt { flush() }
    }

    public func flush() {
        guard !buffer.isEmpty else { return }
        LogfmtLogHandler.writeAll(fd, buffer)
        buffer.removeAll(keepingCapacity: true)
    }
}
