import Glibc
import IgrisEngine

/// `igris serve`'s access log: a worker's lines in logfmt (the same line `LogfmtLogHandler`
/// writes for `igris.access`), gathered in a buffer of its own and written once per loop turn
/// — one write for every connection that closed in it, not one each — or as soon as 64 KiB
/// are waiting. The worker flushes it when it ends, so drain and SIGTERM lose no line.
///
/// A line is formatted straight into the buffer, byte by byte: it runs once per closed
/// connection, and building it from interpolated strings cost as much as the rest of the
/// connection's user-space work (Benchmarks/instructions.py).
public final class LogfmtAccessLog: AccessLogSink {
    private let fd: Int32
    private var buffer: [UInt8] = []
    private static let flushAt = 65536
    /// `YYYY-MM-DDTHH:MM:SS.` of `cachedSecond`: formatted once a second, not once a line.
    private var cachedSecond = -1
    private var secondPrefix: [UInt8] = []

    public init(fd: Int32 = 2) {
        self.fd = fd
        buffer.reserveCapacity(Self.flushAt + 1024)
    }

    public func record(_ r: AccessRecord) {
        // Keys in the order LogfmtLogHandler sorts them.
        append("time=")
        appendTimestamp()
        append(" level=info logger=access msg=closed bytes_down=")
        appendDecimal(r.bytesDown)
        append(" bytes_up=")
        appendDecimal(r.bytesUp)
        append(" client=")
        appendValue(r.client)
        append(" destination=")
        appendValue(r.destination)
        append(" duration=")
        appendSeconds(r.duration)
        append("s listener=")
        appendValue(r.listener)
        append(" reason=")
        buffer.append(contentsOf: r.reason.utf8)
        if let tls = r.tls {
            append(" tls=")
            buffer.append(contentsOf: tls.utf8)
        }
        append(" user=")
        appendValue(r.user)
        buffer.append(UInt8(ascii: "\n"))
        if buffer.count >= Self.flushAt { flush() }
    }

    public func flush() {
        guard !buffer.isEmpty else { return }
        LogfmtLogHandler.writeAll(fd, buffer)
        buffer.removeAll(keepingCapacity: true)
    }

    @inline(__always)
    private func append(_ text: StaticString) {
        buffer.append(contentsOf: UnsafeBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    private func appendDecimal(_ value: UInt64, minimumDigits: Int = 1) {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 20) { digits in
            var n = 0
            var v = value
            repeat {
                digits[n] = UInt8(ascii: "0") + UInt8(v % 10)
                v /= 10
                n += 1
            } while v > 0 || n < minimumDigits
            while n > 0 {
                n -= 1
                buffer.append(digits[n])
            }
        }
    }

    /// A value as `LogfmtLogHandler.quote` writes it; printable ASCII without space, `"` or
    /// `=` (nearly every value) is copied as it is.
    private func appendValue(_ value: String) {
        let copied = value.utf8.withContiguousStorageIfAvailable { bytes -> Bool in
            guard !bytes.isEmpty else { return false }
            for byte in bytes where byte <= 0x20 || byte >= 0x7F || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "=") {
                return false
            }
            buffer.append(contentsOf: bytes)
            return true
        }
        if copied != true { buffer.append(contentsOf: LogfmtLogHandler.quote(value).utf8) }
    }

    /// Seconds to the millisecond, as Swift prints such a Double (`0.001`, `1.5`, `12.0`).
    private func appendSeconds(_ seconds: Double) {
        guard seconds.isFinite, seconds >= 0, seconds < 1e15 else {
            buffer.append(contentsOf: "\(seconds)".utf8)
            return
        }
        let milliseconds = UInt64((seconds * 1000).rounded())
        appendDecimal(milliseconds / 1000)
        buffer.append(UInt8(ascii: "."))
        var fraction = milliseconds % 1000
        var digits = 3
        while digits > 1 && fraction % 10 == 0 {
            fraction /= 10
            digits -= 1
        }
        appendDecimal(fraction, minimumDigits: digits)
    }

    /// RFC 3339 UTC with milliseconds, as `LogfmtLogHandler.timestamp()`.
    private func appendTimestamp() {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        if ts.tv_sec != cachedSecond {
            cachedSecond = ts.tv_sec
            let text = LogfmtLogHandler.timestamp(seconds: ts.tv_sec, milliseconds: 0)
            secondPrefix = Array(text.utf8.dropLast(4))  // without "000Z"
        }
        buffer.append(contentsOf: secondPrefix)
        appendDecimal(UInt64(ts.tv_nsec / 1_000_000), minimumDigits: 3)
        buffer.append(UInt8(ascii: "Z"))
    }
}
