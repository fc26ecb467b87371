import Foundation
import Glibc
import Testing

/// deploy/: the example configurations pass `igris check`; the unit passes systemd-analyze.
@Suite("deploy/")
struct DeployTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    @Test("example configurations are valid", arguments: ["forward.yaml", "socks5.yaml"])
    func examples(file: String) throws {
        let result = try runCommand(productPath("igris"), ["check", "-c", "\(Self.root)/deploy/\(file)"])
        #expect(result.status == 0, "\(result.stderr)")
    }

    @Test("igris.service passes systemd-analyze verify")
    func unit() throws {
        // verify wants the ExecStart binaries to exist: point them at this build.
        let text = try String(contentsOfFile: "\(Self.root)/deploy/igris.service", encoding: .utf8)
            .replacingOccurrences(of: "/usr/local/bin/igris", with: productPath("igris"))
        let dir = NSTemporaryDirectory() + "igris-unit-\(getpid())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try text.write(toFile: "\(dir)/igris.service", atomically: true, encoding: .utf8)
        let (status, out, err) = try runShell("SYSTEMD_LOG_LEVEL=warning systemd-analyze verify \(dir)/igris.service")
        #expect(status == 0, "\(out)\(err)")
        #expect(!(out + err).contains("igris.service:"), "warnings about the unit: \(out)\(err)")
    }
}
