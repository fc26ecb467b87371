import Foundation
import Glibc
import IgrisEngine
import IgrisOperations
import Testing

/// The access log's byte-level formatter writes what the string-built logfmt line was.
@Suite("Access log lines")
struct AccessLogTests {
    /// The line as `LogfmtLogHandler` would build it, after its timestamp.
    static func expected(_ r: AccessRecord) -> String {
        var line = " level=info logger=access msg=closed"
        line += " bytes_down=\(r.bytesDown) bytes_up=\(r.bytesUp) client=\(LogfmtLogHandler.quote(r.client))"
        line += " destination=\(LogfmtLogHandler.quote(r.destination)) duration=\(r.duration)s listener=\(LogfmtLogHandler.quote(r.listener))"
        line += " reason=\(r.reason)"
        if let tls = r.tls { line += " tls=\(tls)" }
        line += " user=\(LogfmtLogHandler.quote(r.user))\n"
        return line
    }

    @Test("values plain and quoted, durations, sizes, TLS or not: the same line, one per record, written at flush")
    func sameLine() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        defer { close(fds[0]) }
        let log = LogfmtAccessLog(fd: fds[1])
        let values = ["127.0.0.1:5000", "", "has space", "q\"uote", "a=b", "line\nbreak", "cr\rlf", "tab\there", "ünïcode", "-", "\u{2028}"]
        let durations: [Double] = [0, 0.001, 0.01, 0.1, 0.5, 1, 1.5, 12.345, 60.05, 3600.999, 86400]
        var records: [AccessRecord] = []
        for (i, v) in values.enumerated() {
            records.append(AccessRecord(listener: v, client: values[(i + 1) % values.count], destination: values[(i + 2) % values.count],
                                        user: values[(i + 3) % values.count], bytesUp: UInt64(i) * 1_000_003, bytesDown: i == 0 ? .max : UInt64(i),
                                        duration: durations[i % durations.count], reason: "client_closed",
                                        tls: i % 2 == 0 ? nil : "TLSv1.3/TLS_AES_128_GCM_SHA256"))
        }
        let before = time(nil)
        for r in records { log.record(r) }
        var probe = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
        #expect(poll(&probe, 1, 0) == 0, "nothing is written before the flush")
        log.flush()
        close(fds[1])
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fds[0], &chunk, chunk.count)
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        let lines = String(decoding: bytes, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        try #require(lines.count == records.count)
        let stamp = try Regex(#"^time=(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{3})Z"#)
        for (line, r) in zip(lines, records) {
            let match = try #require(try stamp.prefixMatch(in: line), "\(line)")
            #expect(String(line[match.range.upperBound...]) + "\n" == Self.expected(r))
            var parts = tm()
            parts.tm_year = Int32(line.dropFirst(5).prefix(4))! - 1900
            parts.tm_mon = Int32(line.dropFirst(10).prefix(2))! - 1
            parts.tm_mday = Int32(line.dropFirst(13).prefix(2))!
            parts.tm_hour = Int32(line.dropFirst(16).prefix(2))!
            parts.tm_min = Int32(line.dropFirst(19).prefix(2))!
            parts.tm_sec = Int32(line.dropFirst(22).prefix(2))!
            let at = timegm(&parts)
            #expect(at >= before && at <= time(nil), "\(line.prefix(29))")
        }
    }
}
