import Foundation
import Glibc
import IgrisEngine
import Testing

@Suite("Allocations", .serialized)
struct AllocationTests {
    /// Forwarding 2 × 20,000 operations must not allocate per operation, judged on the
    /// release build (`make test` builds `igris-allocations` with `-c release`, as swift-nio
    /// runs its allocation counters): hot-path code is measured as it ships, not bent into
    /// shapes only an unoptimised build needs. The probe counts every malloc in its process
    /// while its client does raw-buffer round trips; the echo upstream is another process.
    /// A small allowance covers the runtime's own bookkeeping, far below one per operation.
    /// Under a sanitizer (`make test-asan`/`test-tsan` define IGRIS_SANITIZED) the sanitizer
    /// owns malloc: the count means nothing there.
    #if IGRIS_SANITIZED
    static let countsMallocs = false
    #else
    static let countsMallocs = true
    #endif

    @Test("steady-state forwarding allocates nothing per operation (release build)",
          .enabled(if: countsMallocs, "a sanitizer owns malloc in this build"), arguments: engineBackends)
    func noAllocationPerOperation(backend: BackendChoice) throws {
        let probe = releaseProductPath("igris-allocations")
        guard FileManager.default.isExecutableFile(atPath: probe) else {
            Issue.record("\(probe) is missing: `make test` builds it (swift build -c release --product igris-allocations)")
            return
        }
        let echo = try ChildProcess(productPath("igris-load"), ["echo", "--listen", "127.0.0.1:0"])
        defer { echo.terminate() }
        let line = echo.readLine()
        let upstream = String(try #require(line.split(separator: " ").last))
        let run = try ChildProcess(probe, ["--backend", backend.rawValue, "--upstream", upstream, "--round-trips", "10000"])
        let report = run.readLine()
        run.process.waitUntilExit()
        #expect(run.process.terminationStatus == 0, "\(report)")
        let fields = report.split(separator: " ")
        let allocations = try #require(fields.count >= 2 ? Int(fields[1]) : nil, "unexpected report '\(report)'")
        print("allocations during 10,000 round trips on \(backend.rawValue), release build: \(allocations)")
        // 10,000 round trips = 40,000+ recv/send completions in the gateway.
        #expect(allocations < 50, "\(allocations) allocations during 10,000 round trips")
    }
}

/// An executable of this package's release build (beside the debug one this test runs in).
func releaseProductPath(_ name: String) -> String {
    URL(fileURLWithPath: productPath(name)).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("release").appendingPathComponent(name).path
}
