import Foundation
import Glibc
import Testing

/// deploy/: the example configurations pass `igris check`; the unit passes systemd-analyze.
@Suite("deploy/")
struct DeployTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    @Test("example configurations are valid", arguments: ["forward.yaml", "socks5.yaml", "fleet/igris.yaml"])
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

    /// `make test` installs kubernetes-validate (PyPI) into .build/tools/venv.
    static let kubernetesValidate = "\(root)/.build/tools/venv/bin/kubernetes-validate"

    @Test("deploy/kubernetes/ passes kubernetes-validate --strict (offline schemas); a broken manifest does not")
    func kubernetesManifests() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.kubernetesValidate) else {
            Issue.record("no \(Self.kubernetesValidate): run `make test`, which installs it")
            return
        }
        let dir = "\(Self.root)/deploy/kubernetes"
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") }.sorted()
        #expect(files == ["configmap.yaml", "deployment.yaml", "secret.yaml", "service.yaml"])
        let (status, out, err) = try runShell("\(Self.kubernetesValidate) --strict \(files.map { "\(dir)/\($0)" }.joined(separator: " "))")
        #expect(status == 0, "\(out)\(err)")
        for kind in ["deployment/igris", "service/igris", "configmap/igris-config", "secret/igris-users", "poddisruptionbudget/igris"] {
            #expect(out.contains("passed for resource \(kind)"), "\(kind) not validated: \(out)")
        }
        // The check can fail: a misspelt field is refused.
        let broken = try String(contentsOfFile: "\(dir)/deployment.yaml", encoding: .utf8)
            .replacingOccurrences(of: "terminationGracePeriodSeconds", with: "terminationGracePeriodSecs")
        let path = try writeTemporaryFile(broken)
        defer { unlink(path) }
        #expect(try runShell("\(Self.kubernetesValidate) --strict \(path)").0 != 0)
    }

    @Test("the ConfigMap's igris.yaml and the Secret's users file pass igris check; the grace period covers the drain")
    func kubernetesConfiguration() throws {
        let dir = "\(Self.root)/deploy/kubernetes"
        func block(_ file: String, _ key: String) throws -> String {
            // The literal block under `key: |`, dedented.
            let lines = try String(contentsOfFile: "\(dir)/\(file)", encoding: .utf8).split(separator: "\n", omittingEmptySubsequences: false)
            guard let start = lines.firstIndex(where: { $0.trimmingCharacters(in: .whitespaces) == "\(key): |" }) else { return "" }
            var out: [String] = []
            for line in lines[(start + 1)...] {
                if !line.isEmpty && !line.hasPrefix("    ") { break }
                out.append(String(line.dropFirst(min(4, line.count))))
            }
            return out.joined(separator: "\n")
        }
        let users = try writeTemporaryFile(try block("secret.yaml", "users.yaml"))
        defer { unlink(users) }
        let config = try block("configmap.yaml", "igris.yaml").replacingOccurrences(of: "/etc/igris/users/users.yaml", with: users)
        #expect(config.contains("drain_timeout: 10m") && config.contains("drain_grace: 5s"))
        let path = try writeTemporaryFile(config)
        defer { unlink(path) }
        let result = try runCommand(productPath("igris"), ["check", "-c", path])
        #expect(result.status == 0, "\(result.stderr)")
        let deployment = try String(contentsOfFile: "\(dir)/deployment.yaml", encoding: .utf8)
        #expect(deployment.contains("terminationGracePeriodSeconds: 615"), "5 s grace + 10 min drain + 10 s")
        #expect(deployment.contains("path: /readyz") && deployment.contains("path: /healthz") && deployment.contains("preStop"))
    }
}
