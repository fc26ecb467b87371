import ArgumentParser
import Glibc
import IgrisEngine
import IgrisTLS

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Report what this kernel offers IGRIS and which backend --backend auto would pick.")

    func run() throws {
        let out = FileDescriptorOutput.standardOutput
        out.write("kernel: Linux \(IOUringProbe.kernelRelease())\n")
        let probe = IOUringProbe.run()
        out.write("io_uring: \(probe.usable ? "usable" : "unusable") (\(probe.reason))\n")
        for line in IOUringProbe.report() { out.write("  \(line)\n") }
        var limit = rlimit()
        getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        let ktls = KernelTLS.support
        out.write("kTLS: \(ktls.available ? "available" : "unavailable") (\(ktls.reason))\(ktls.available ? "" : "; TLS runs in user space (OpenSSL 3)")\n")
        out.write("RLIMIT_NOFILE: soft \(limit.rlim_cur), hard \(limit.rlim_max)\n")
        out.write("--backend auto would use: \(probe.usable ? "io_uring" : "epoll")\n")
    }
}
