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
        let workers = Syscall.onlineCPUs()
        out.write("bridges at most, \(workers) workers: \(Server.defaultMaxConnections(workers: workers, listeners: 1)) with regular descriptors "
                  + "(epoll, io_uring: two each within RLIMIT_NOFILE)\n")
        if probe.usable {
            let direct = IOUringProbe.directDescriptors()
            if direct.entries > 0 {
                out.write("  io_uring --direct-descriptors: \(Server.defaultMaxConnections(workers: workers, listeners: 1, direct: true)) "
                          + "(a fixed-file table of \(direct.description) per worker; aborts send \(direct.resets ? "RST" : "FIN: setsockopt through the ring needs 6.7+"))\n")
            } else {
                out.write("  io_uring --direct-descriptors: unavailable (\(direct.description))\n")
            }
        }
        out.write("--backend auto would use: \(probe.usable ? "io_uring" : "epoll")\n")
    }
}
