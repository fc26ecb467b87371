import Glibc
import CURing
import CLinux

/// Can this process use io_uring the way IGRIS does? Answers with a reason either way, for
/// `--backend auto` and for `igris probe`.
public enum IOUringProbe {
    public struct Result: Sendable {
        public var usable: Bool
        public var reason: String
    }

    /// Opcodes the engine submits.
    static let requiredOpcodes: [(UInt32, String)] = [
        (UInt32(IORING_OP_ACCEPT.rawValue), "ACCEPT"),
        (UInt32(IORING_OP_CONNECT.rawValue), "CONNECT"),
        (UInt32(IORING_OP_RECV.rawValue), "RECV"),
        (UInt32(IORING_OP_SEND.rawValue), "SEND"),
        (UInt32(IORING_OP_CLOSE.rawValue), "CLOSE"),
        (UInt32(IORING_OP_ASYNC_CANCEL.rawValue), "ASYNC_CANCEL"),
        (UInt32(IORING_OP_POLL_ADD.rawValue), "POLL_ADD"),
    ]

    /// `kernel.io_uring_disabled` (6.6+): 0 allowed, 1 only for io_uring_group, 2 disabled.
    static func disabledSysctl() -> Int? {
        let fd = igris_open_read("/proc/sys/kernel/io_uring_disabled")
        guard fd >= 0 else { return nil }
        defer { Syscall.close(fd) }
        var byte: UInt8 = 0
        guard read(fd, &byte, 1) == 1, byte >= 48, byte <= 57 else { return nil }
        return Int(byte - 48)
    }

    public static func kernelRelease() -> String {
        var buffer = [CChar](repeating: 0, count: 128)
        guard igris_kernel_release(&buffer, buffer.count) == 0 else { return "unknown" }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    /// Everything `igris probe` reports, line by line: opcodes and setup flags IGRIS uses,
    /// ring features, and the limits that decide how many connections fit.
    public static func report() -> [String] {
        var lines: [String] = []
        let sysctl = disabledSysctl()
        lines.append("kernel.io_uring_disabled: \(sysctl.map(String.init) ?? "absent (kernel < 6.6: io_uring allowed)")")
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        defer { ring.deallocate() }
        var params = io_uring_params()
        ring.initialize(to: io_uring())
        let rc = io_uring_queue_init_params(8, ring, &params)
        if rc == 0 {
            let features: [(UInt32, String, String)] = [
                (UInt32(IORING_FEAT_NODROP), "NODROP", "completions are never dropped on CQ overflow"),
                (UInt32(IORING_FEAT_EXT_ARG), "EXT_ARG", "wait with a timeout in one io_uring_enter"),
                (UInt32(IORING_FEAT_FAST_POLL), "FAST_POLL", "internal poll instead of io-wq for sockets"),
            ]
            for (bit, name, what) in features {
                lines.append("feature \(name): \(params.features & bit != 0 ? "yes" : "no") (\(what))")
            }
            if let probe = io_uring_get_probe_ring(ring) {
                let optional: [(UInt32, String, String)] = [
                    (UInt32(IORING_OP_SEND_ZC.rawValue), "SEND_ZC", "--send-zc"),
                ]
                for (op, name) in requiredOpcodes {
                    lines.append("opcode \(name): \(io_uring_opcode_supported(probe, Int32(op)) != 0 ? "yes" : "NO (required)")")
                }
                for (op, name, flag) in optional {
                    lines.append("opcode \(name): \(io_uring_opcode_supported(probe, Int32(op)) != 0 ? "yes" : "no (\(flag) falls back)")")
                }
                io_uring_free_probe(probe)
            }
            io_uring_queue_exit(ring)
            let flags: [(UInt32, String)] = [
                (UInt32(IORING_SETUP_SINGLE_ISSUER) | UInt32(IORING_SETUP_DEFER_TASKRUN), "SINGLE_ISSUER|DEFER_TASKRUN"),
                (UInt32(IORING_SETUP_COOP_TASKRUN), "COOP_TASKRUN"),
            ]
            for (flag, name) in flags {
                var p = io_uring_params()
                p.flags = flag
                ring.initialize(to: io_uring())
                let ok = io_uring_queue_init_params(8, ring, &p) == 0
                if ok { io_uring_queue_exit(ring) }
                lines.append("setup \(name): \(ok ? "yes" : "no")")
            }
        } else {
            lines.append("io_uring_setup: \(Errno.describe(-rc))")
        }
        func readSysctl(_ path: String) -> String {
            let fd = igris_open_read(path)
            guard fd >= 0 else { return "unavailable" }
            defer { Syscall.close(fd) }
            var buffer = [UInt8](repeating: 0, count: 128)
            let n = read(fd, &buffer, buffer.count)
            guard n > 0 else { return "unavailable" }
            return String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "\n").first.map { $0.replacingTabs() } ?? ""
        }
        for (name, path) in [("fs.pipe-max-size", "/proc/sys/fs/pipe-max-size"), ("fs.pipe-user-pages-soft", "/proc/sys/fs/pipe-user-pages-soft"),
                             ("fs.nr_open", "/proc/sys/fs/nr_open"), ("net.core.somaxconn", "/proc/sys/net/core/somaxconn"),
                             ("net.ipv4.ip_local_port_range", "/proc/sys/net/ipv4/ip_local_port_range"), ("net.ipv4.tcp_mem", "/proc/sys/net/ipv4/tcp_mem")] {
            lines.append("\(name): \(readSysctl(path))")
        }
        var limit = rlimit()
        getrlimit(__rlimit_resource_t(8), &limit)  // RLIMIT_MEMLOCK (hidden from Swift by the module map)
        lines.append("RLIMIT_MEMLOCK: soft \(limit.rlim_cur == rlim_t.max ? "unlimited" : "\(limit.rlim_cur)"), hard \(limit.rlim_max == rlim_t.max ? "unlimited" : "\(limit.rlim_max)")")
        return lines
    }

    /// What `direct_descriptors` gives here: a ring's fixed-file table of RLIMIT_NOFILE
    /// entries (0 when the kernel refuses one), whether aborts still send RST, and how it runs.
    public static func directDescriptors() -> (entries: Int, resets: Bool, description: String) {
        var configuration = BackendConfiguration(bufferSize: 4096, bufferCount: 2, ringEntries: 8)
        configuration.initialBufferCount = 2
        configuration.directDescriptors = Syscall.descriptorLimit
        do {
            let backend = try URingBackend(configuration: configuration)
            return (backend.directCapacity, backend.directAbortsWithReset, backend.directDescription)
        } catch {
            return (0, false, "no ring: \(error)")
        }
    }

    /// `run()`'s answer, found once per process: choosing the backend and sizing for direct
    /// descriptors both ask, and each run sets up a ring.
    public static let result = run()

    public static func run() -> Result {
        let sysctl = disabledSysctl()
        if sysctl == 2 {
            return Result(usable: false, reason: "kernel.io_uring_disabled=2 disables io_uring on this host")
        }
        let ring = UnsafeMutablePointer<io_uring>.allocate(capacity: 1)
        ring.initialize(to: io_uring())
        defer { ring.deallocate() }
        let rc = io_uring_queue_init(8, ring, 0)
        if rc != 0 {
            switch -rc {
            case ENOSYS:
                return Result(usable: false, reason: "io_uring_setup: ENOSYS (kernel built without io_uring)")
            case EPERM:
                let why = sysctl == 1 ? "kernel.io_uring_disabled=1 and this process is not in io_uring_group"
                    : "blocked by a seccomp profile (Docker ≥ 25 and containerd 2 block it by default)"
                return Result(usable: false, reason: "io_uring_setup: EPERM, \(why)")
            default:
                return Result(usable: false, reason: "io_uring_setup: \(Errno.describe(-rc))")
            }
        }
        defer { io_uring_queue_exit(ring) }
        guard let probe = io_uring_get_probe_ring(ring) else {
            return Result(usable: false, reason: "IORING_REGISTER_PROBE unsupported (kernel < 5.6)")
        }
        defer { io_uring_free_probe(probe) }
        for (op, name) in requiredOpcodes where io_uring_opcode_supported(probe, Int32(op)) == 0 {
            return Result(usable: false, reason: "opcode IORING_OP_\(name) unsupported by this kernel")
        }
        // Provided buffer rings (5.19) come with multishot accept (5.19): probe the former.
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        guard let mem = mmap(nil, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), mem != UnsafeMutableRawPointer(bitPattern: -1) else {
            return Result(usable: false, reason: "mmap failed while probing")
        }
        defer { munmap(mem, page) }
        let reg = igris_uring_register_buf_ring(ring, mem, 1, 7)
        if reg != 0 {
            return Result(usable: false, reason: "provided buffer rings unsupported (\(Errno.describe(-reg)); needs Linux 5.19)")
        }
        return Result(usable: true, reason: "io_uring available on Linux \(kernelRelease()) with every opcode IGRIS uses")
    }
}

extension Substring {
    func replacingTabs() -> String { String(map { $0 == "\t" ? " " : $0 }) }
}
