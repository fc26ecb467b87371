import Glibc
import CLinux

/// One server's active health check, run by one worker: a non-blocking connect through the
/// worker's own backend every interval, bounded by a timeout. Never blocks the loop.
struct HealthProbe {
    let pool: UpstreamPool
    let server: Int
    var fd: Int32 = -1
    var connectPending = false
    /// Identifies the connect in flight (its token's generation): a late completion for an
    /// earlier attempt is ignored.
    var sequence: UInt32 = 0
    var deadline: UInt64 = 0
    var nextAt: UInt64 = 0
    var successes = 0
    var failures = 0
}

extension Worker {
    /// The pools this worker checks: each pool is checked by exactly one worker.
    static func makeProbes(listeners: [ListenerRule], worker: Int, workers: Int, now: UInt64) -> [HealthProbe] {
        var pools: [UpstreamPool] = []
        for l in listeners {
            if let pool = l.pool, pool.healthCheck != nil, !pools.contains(where: { $0 === pool }) { pools.append(pool) }
        }
        pools.sort { $0.name < $1.name }
        var probes: [HealthProbe] = []
        for (k, pool) in pools.enumerated() where k % max(1, workers) == worker {
            for server in pool.servers.indices {
                // Spread the first checks over the interval instead of all at once.
                let offset = pool.healthCheck!.intervalNanoseconds / UInt64(pool.servers.count) * UInt64(server)
                probes.append(HealthProbe(pool: pool, server: server, nextAt: now + offset))
            }
        }
        return probes
    }

    /// Starts checks that are due and times out those that took too long. Once per turn.
    func runHealthChecks() {
        var k = 0
        while k < probes.count {
            let check = probes[k].pool.healthCheck!
            if probes[k].fd >= 0 {
                if now >= probes[k].deadline {
                    endProbe(k)
                    record(k, success: false, why: "timeout")
                }
            } else if !draining && now >= probes[k].nextAt {
                startProbe(k, check)
            }
            k += 1
        }
    }

    /// The earliest moment a check must start or time out (nil: none).
    func nextHealthCheckEvent() -> UInt64? {
        var earliest: UInt64? = nil
        var k = 0
        while k < probes.count {
            let t = probes[k].fd >= 0 ? probes[k].deadline : (draining ? UInt64.max : probes[k].nextAt)
            if t != .max { earliest = min(earliest ?? t, t) }
            k += 1
        }
        return earliest
    }

    private func startProbe(_ k: Int, _ check: HealthCheck) {
        let pool = probes[k].pool
        let server = probes[k].server
        probes[k].nextAt = now + check.intervalNanoseconds
        guard let fd = try? Syscall.streamSocket(family: pool.servers[server].family) else {
            return  // out of descriptors: try again next interval, without judging the server
        }
        probes[k].fd = fd
        probes[k].sequence = (probes[k].sequence &+ 1) & 0xFF_FFFF
        probes[k].deadline = now + check.timeoutNanoseconds
        let token = connectToken(k)
        probes[k].connectPending = true
        (pool.addresses + server).withMemoryRebound(to: sockaddr.self, capacity: 1) {
            backend.connect(fd: fd, address: $0, length: pool.servers[server].length, token: token)
        }
    }

    func onHealthConnect(_ c: Completion) {
        let k = Int(c.token.index)
        guard k < probes.count, probes[k].fd >= 0, probes[k].sequence == c.token.generation else { return }
        probes[k].connectPending = false
        endProbe(k)
        record(k, success: c.result >= 0, why: c.result >= 0 ? "" : Errno.describe(-c.result))
    }

    /// Closes the probe's socket (cancelling its connect if still pending).
    private func endProbe(_ k: Int) {
        let pending = probes[k].connectPending ? PendingOperations(write: connectToken(k)) : .none
        backend.close(fd: probes[k].fd, pending: pending, abort: false, token: OperationToken(index: UInt32(k), generation: 0, kind: .healthClose))
        probes[k].fd = -1
        probes[k].connectPending = false
    }

    private func connectToken(_ k: Int) -> OperationToken {
        OperationToken(index: UInt32(k), generation: probes[k].sequence, kind: .healthConnect)
    }

    /// rise/fall: only a run of results changes a server's state.
    private func record(_ k: Int, success: Bool, why: String) {
        let pool = probes[k].pool
        let server = probes[k].server
        let check = pool.healthCheck!
        if success {
            probes[k].successes += 1
            probes[k].failures = 0
            if !pool.isUp(server) && probes[k].successes >= check.rise {
                pool.setUp(server, true)
                statistics.add(.serversUp)
                logger.notice("server up", metadata: ["pool": "\(pool.name)", "server": "\(pool.describe(server))"])
            }
        } else {
            probes[k].failures += 1
            probes[k].successes = 0
            if pool.isUp(server) && probes[k].failures >= check.fall {
                pool.setUp(server, false)
                statistics.add(.serversDown)
                logger.warning("server down", metadata: ["pool": "\(pool.name)", "server": "\(pool.describe(server))", "error": "\(why)"])
            }
        }
    }

    /// Draining: checks stop; sockets in flight are closed.
    func stopHealthChecks() {
        var k = 0
        while k < probes.count {
            if probes[k].fd >= 0 { endProbe(k) }
            k += 1
        }
    }
}
