import IgrisEngine
import IgrisTLS
import IgrisNegotiation
import IgrisPolicy

/// Prometheus text exposition (format 0.0.4) of a running server: per-worker counters are
/// summed here, at scrape time, so the workers only ever do relaxed stores.
public struct MetricsRenderer: Sendable {
    public let server: Server
    /// The negotiations' users and resolver (nil: a server of plain forwards only).
    public let gateway: Gateway?

    public init(server: Server, gateway: Gateway? = nil) {
        self.server = server
        self.gateway = gateway
    }

    public func render() -> String {
        // Every listener so far (reloads append), for the `listener` label.
        let listenerNames = server.listenerNames
        var out = MetricsText()
        out.family("igris_build_info", "gauge", "Build and backend of this process (always 1).")
        out.sample("igris_build_info", ["backend": "\(server.backend)", "version": "0.1.0"], 1)
        out.family("igris_workers", "gauge", "Worker threads, one event loop each.")
        out.sample("igris_workers", [:], Int64(server.configuration.workers))
        out.family("igris_draining", "gauge", "1 once SIGTERM started the drain (readyz fails).")
        out.sample("igris_draining", [:], server.isDraining ? 1 : 0)

        out.family("igris_connections_active", "gauge", "Connections open now (handshaking, connecting or bridging), per listener.")
        for (i, name) in listenerNames.enumerated() { out.sample("igris_connections_active", ["listener": name], server.total(listener: i, .active)) }
        out.family("igris_connections_total", "counter", "Connections accepted, per listener.")
        for (i, name) in listenerNames.enumerated() { out.sample("igris_connections_total", ["listener": name], server.total(listener: i, .accepted)) }
        out.family("igris_bytes_total", "counter", "Bytes forwarded, per listener and direction.")
        for (i, name) in listenerNames.enumerated() {
            out.sample("igris_bytes_total", ["listener": name, "direction": "client_to_upstream"], server.total(listener: i, .bytesClientToUpstream))
            out.sample("igris_bytes_total", ["listener": name, "direction": "upstream_to_client"], server.total(listener: i, .bytesUpstreamToClient))
        }

        let counters: [(String, WorkerStatistics.Counter, String)] = [
            ("igris_rejected_at_capacity_total", .rejectedAtCapacity, "Connections closed at once: max_connections reached or no descriptor."),
            ("igris_source_limit_rejections_total", .sourceConnectionRejections, "Connections refused at accept: their source was at max_connections_per_source."),
            ("igris_handshake_limit_rejections_total", .handshakeLimitRejections, "Connections refused at accept: max_handshakes connections were still negotiating."),
            ("igris_handshakes_evicted_total", .handshakesEvicted, "Handshakes stalled on their client for 2 s, reset at max_handshakes to let a new client in."),
            ("igris_source_handshake_rejections_total", .sourceHandshakeRejections, "Connections refused at accept: their source had max_handshakes_per_source connections still negotiating."),
            ("igris_accept_errors_total", .acceptErrors, "accept() failures other than running out of descriptors."),
            ("igris_accept_pauses_total", .acceptPauses, "Times accepting paused 100 ms for lack of descriptors (EMFILE/ENFILE)."),
            ("igris_connect_failures_total", .connectFailures, "Upstream or destination connects that failed (refused, unreachable)."),
            ("igris_connect_timeouts_total", .connectTimeouts, "Upstream or destination connects that timed out."),
            ("igris_idle_timeouts_total", .idleTimeouts, "Bridges closed by the idle timeout."),
            ("igris_dead_peers_total", .deadPeers, "Bridges closed because a peer stopped answering keepalive probes or acknowledging bytes."),
            ("igris_closed_graceful_total", .closedGracefully, "Bridges that ended with both directions shut down cleanly."),
            ("igris_closed_aborted_total", .closedAborted, "Bridges aborted by a reset or error on one side."),
            ("igris_drain_aborted_total", .drainAborted, "Connections still open at the drain deadline."),
            ("igris_buffer_exhaustions_total", .bufferExhaustions, "Receives that found the buffer pool empty and waited."),
            ("igris_completion_overflows_total", .completionOverflows, "io_uring completion queue overflows."),
            ("igris_splice_bytes_total", .spliceBytes, "Bytes moved socket to pipe to socket without entering user space."),
            ("igris_splice_fallbacks_total", .pipeFallbacks, "Directions that stayed on copy because no pipe could be had."),
            ("igris_splice_bytes_dropped_total", .spliceBytesDropped, "Bytes left in a pipe when its bridge was aborted."),
            ("igris_direct_bridges_total", .directBridges, "Bridges whose sockets moved to the io_uring ring's fixed-file table (direct_descriptors)."),
            ("igris_direct_table_full_total", .directDescriptorMisses, "Bridges that kept their regular descriptors because the fixed-file table was full."),
            ("igris_handshakes_total", .handshakesCompleted, "SOCKS5 / HTTP CONNECT handshakes that reached bridging."),
            ("igris_handshake_failures_total", .handshakeFailures, "Handshakes refused as malformed or unsupported."),
            ("igris_handshake_timeouts_total", .handshakeTimeouts, "Handshakes closed at the handshake timeout."),
            ("igris_auth_failures_total", .authFailures, "Failed authentications (wrong password, unknown or expired user, rate-limited)."),
            ("igris_auth_busy_total", .authBusy, "Logins refused unchecked because the password-check queue had no room for them."),
            ("igris_acl_denied_total", .aclDenied, "Destinations refused by the ACL."),
            ("igris_resolve_failures_total", .resolveFailures, "Destination names that did not resolve."),
            ("igris_user_limit_rejections_total", .userLimitRejections, "Connections refused because the user was at max_connections."),
            ("igris_account_revocations_total", .accountsRevoked, "Open tunnels ended because their user expired or was removed from the users file."),
            ("igris_throttle_pauses_total", .throttlePauses, "Times a rate-limited direction paused its receives."),
            ("igris_http_bytes_after_request_dropped_total", .bytesAfterRequestDropped, "HTTP proxy: bytes a client sent after a forwarded request's body (never forwarded to that origin)."),
            ("igris_udp_associations_total", .udpAssociationsTotal, "SOCKS5 UDP associations opened."),
            ("igris_udp_relay_ports_exhausted_total", .udpRelayPortsExhausted, "UDP ASSOCIATE requests refused because no port of udp_relay_ports was free."),
            ("igris_udp_datagrams_to_destination_total", .udpDatagramsToDestination, "Datagrams relayed from clients to destinations."),
            ("igris_udp_datagrams_to_client_total", .udpDatagramsToClient, "Datagrams relayed from destinations to clients."),
            ("igris_udp_bytes_to_destination_total", .udpBytesToDestination, "Payload bytes relayed from clients to destinations."),
            ("igris_udp_bytes_to_client_total", .udpBytesToClient, "Payload bytes relayed from destinations to clients."),
            ("igris_busy_polls_total", .busyPolls, "Waits for completions that polled before sleeping (busy_poll)."),
            ("igris_busy_poll_hits_total", .busyPollHits, "Busy polls that found a completion, and so saved a sleep and a wake-up."),
            ("igris_tls_handshakes_total", .tlsHandshakes, "TLS handshakes completed, with clients and with upstreams."),
            ("igris_tls_resumed_total", .tlsResumed, "TLS handshakes that resumed a session from a ticket."),
            ("igris_tls_client_identities_total", .tlsClientIdentities, "Connections whose user a client certificate named."),
            ("igris_tls_offloaded_total", .tlsOffloaded, "TLS connections handed to the kernel (kTLS) after their handshake."),
            ("igris_tls_compact_total", .tlsRecordsWithoutOpenSSL, "TLS 1.3 connections whose records went on without OpenSSL's SSL object after the handshake (user space, no kTLS)."),
            ("igris_tls_offload_failures_total", .tlsOffloadFailures, "kTLS hand-offs the kernel refused (the connection stayed in user space, or closed)."),
            ("igris_tls_record_failures_total", .tlsRecordFailures, "Bridges reset because a TLS record failed (bad MAC, malformed)."),
            ("igris_proxy_header_rejected_total", .proxyHeaderRejected, "Connections closed for a missing, malformed or untrusted (not in proxy_protocol_from) PROXY header."),
        ]
        for (name, counter, help) in counters {
            out.family(name, "counter", help)
            out.sample(name, [:], server.total(counter))
        }

        out.family("igris_udp_associations_active", "gauge", "SOCKS5 UDP associations open now.")
        out.sample("igris_udp_associations_active", [:], server.total(.udpAssociationsActive))
        out.family("igris_udp_dropped_total", "counter", "Datagrams dropped, by reason.")
        for reason in DatagramDrop.allCases {
            out.sample("igris_udp_dropped_total", ["reason": reason.label], server.total(WorkerStatistics.udpDropCounter(reason)))
        }
        out.family("igris_handshakes_active", "gauge", "Connections still negotiating (SOCKS5, HTTP CONNECT, PROXY header) now, all workers; counted while per-source limits are on.")
        out.sample("igris_handshakes_active", [:], server.total(.handshakesActive))
        out.family("igris_worker_cpu_seconds_total", "counter", "CPU seconds (user + system) each worker thread has used (io_uring's own kernel workers, iou-wrk, count separately).")
        for (w, seconds) in server.workerCPUSeconds().enumerated() { out.sample("igris_worker_cpu_seconds_total", ["worker": "\(w)"], double: seconds) }
        out.family("igris_buffers_in_use", "gauge", "Pool buffers lent out, per worker.")
        for (w, s) in server.statistics.enumerated() { out.sample("igris_buffers_in_use", ["worker": "\(w)"], s.load(.buffersInUse)) }
        out.family("igris_accept_paused", "gauge", "1 while a worker's accepting is paused for lack of descriptors or memory (within the last second).")
        for (w, s) in server.statistics.enumerated() { out.sample("igris_accept_paused", ["worker": "\(w)"], s.load(.acceptPaused)) }
        out.family("igris_buffers", "gauge", "Pool buffers per worker at most (its share of buffer_memory).")
        out.sample("igris_buffers", [:], Int64(server.configuration.buffers.bufferCount))
        out.family("igris_buffers_active", "gauge", "Pool buffers in circulation (free or lent), per worker; the pool grows to igris_buffers on demand and shrinks when idle.")
        for (w, s) in server.statistics.enumerated() { out.sample("igris_buffers_active", ["worker": "\(w)"], s.load(.buffersActive)) }
        out.family("igris_buffer_memory_bytes", "gauge", "Bytes of pool buffers in circulation, all workers.")
        out.sample("igris_buffer_memory_bytes", [:], server.statistics.reduce(Int64(0)) { $0 + $1.load(.buffersActive) } * Int64(server.configuration.buffers.bufferSize))
        out.family("igris_buffers_parked_total", "counter", "Buffers taken out of circulation as the pool shrank (their pages given back).")
        out.sample("igris_buffers_parked_total", [:], server.total(.buffersParked))
        out.family("igris_room_waits_total", "counter", "Times a direction waited for room in its destination before reading (slow readers).")
        out.sample("igris_room_waits_total", [:], server.total(.roomWaits))
        out.family("igris_short_sends_total", "counter", "Sends the destination took only part of: the rest waits for room, holding its buffer.")
        out.sample("igris_short_sends_total", [:], server.total(.shortSends))
        out.family("igris_reserve_waits_total", "counter", "Reads put off because only the pool's reserve was left and the destination had bytes queued.")
        out.sample("igris_reserve_waits_total", [:], server.total(.reserveWaits))
        out.family("igris_pipes_in_use", "gauge", "Splice pipes borrowed, per worker.")
        for (w, s) in server.statistics.enumerated() { out.sample("igris_pipes_in_use", ["worker": "\(w)"], s.load(.pipesInUse)) }

        histogram(&out, "igris_upstream_connect_duration_seconds", "Time from starting an upstream connect to the bridge being up.", server.connectLatency())
        histogram(&out, "igris_tls_handshake_duration_seconds", "TLS handshakes completed, from accept (clients) or from the connect (upstreams).",
                  server.tlsHandshakeDuration())
        out.family("igris_tls_handshake_failures_total", "counter", "TLS handshakes that failed, by reason.")
        for reason in TLSFailure.Reason.allCases {
            out.sample("igris_tls_handshake_failures_total", ["reason": reason.rawValue], server.total(WorkerStatistics.tlsFailureCounter(reason)))
        }

        var pools: [UpstreamPool] = []
        for (rule, _) in server.openListeners {
            if let p = rule.pool, !pools.contains(where: { $0 === p }) { pools.append(p) }
        }
        if !pools.isEmpty {
            out.family("igris_upstream_up", "gauge", "1 while a pool server is in rotation (health checks), per pool and server.")
            for p in pools { for i in p.servers.indices { out.sample("igris_upstream_up", ["pool": p.name, "server": "\(p.servers[i])"], p.isUp(i) ? 1 : 0) } }
            out.family("igris_upstream_connections", "gauge", "Open connections per pool server (what least_conn balances).")
            for p in pools { for i in p.servers.indices { out.sample("igris_upstream_connections", ["pool": p.name, "server": "\(p.servers[i])"], Int64(p.activeConnections(i))) } }
        }
        out.family("igris_servers_down_total", "counter", "Times health checks took a server out of rotation.")
        out.sample("igris_servers_down_total", [:], server.total(.serversDown))
        out.family("igris_servers_up_total", "counter", "Times health checks put a server back.")
        out.sample("igris_servers_up_total", [:], server.total(.serversUp))

        let accounts = server.accounts
        if !accounts.isEmpty {
            out.family("igris_user_connections_active", "gauge", "Connections open now, per user.")
            for a in accounts { out.sample("igris_user_connections_active", ["user": a.name], Int64(a.activeConnections)) }
            out.family("igris_user_connections_total", "counter", "Connections opened, per user.")
            for a in accounts { out.sample("igris_user_connections_total", ["user": a.name], a.connectionsTotal) }
            out.family("igris_user_bytes_total", "counter", "Bytes forwarded, per user and direction.")
            for a in accounts {
                out.sample("igris_user_bytes_total", ["user": a.name, "direction": "client_to_upstream"], a.bytesToDestination)
                out.sample("igris_user_bytes_total", ["user": a.name, "direction": "upstream_to_client"], a.bytesToClient)
            }
        }
        guard let policy = gateway?.policy else { return out.text }
        if let auth = policy.authenticator {
            out.family("igris_auth_kdf_runs_total", "counter", "argon2id verifications run (cache misses).")
            out.sample("igris_auth_kdf_runs_total", [:], auth.kdfRunCount)
            out.family("igris_auth_cache_hits_total", "counter", "Logins answered from the success cache, without argon2id or queueing.")
            out.sample("igris_auth_cache_hits_total", [:], auth.cacheHitCount)
            out.family("igris_auth_locked_out_total", "counter", "Logins refused without argon2id: their source or user name was past its failure limit.")
            out.sample("igris_auth_locked_out_total", [:], auth.rateLimitedCount)
        }
        if let queue = gateway?.startedPasswordCheckQueue {
            out.family("igris_auth_queue_waiting", "gauge", "Password checks waiting for an argon2id thread.")
            out.sample("igris_auth_queue_waiting", [:], Int64(queue.waitingCount))
            out.family("igris_auth_checks_skipped_total", "counter", "Queued password checks skipped because the client had gone.")
            out.sample("igris_auth_checks_skipped_total", [:], queue.skippedCount)
        }
        let resolver = policy.resolver
        out.family("igris_resolver_lookups_total", "counter", "getaddrinfo calls (cache misses).")
        out.sample("igris_resolver_lookups_total", [:], resolver.lookups)
        out.family("igris_resolver_cache_hits_total", "counter", "Names answered from the resolver cache.")
        out.sample("igris_resolver_cache_hits_total", [:], resolver.cacheHits)
        return out.text
    }

    private func histogram(_ out: inout MetricsText, _ name: String, _ help: String, _ h: (buckets: [Int64], sumNanoseconds: Int64)) {
        out.family(name, "histogram", help)
        var cumulative: Int64 = 0
        for (i, bound) in WorkerStatistics.connectLatencyBounds.enumerated() {
            cumulative += h.buckets[i]
            out.sample("\(name)_bucket", ["le": seconds(bound)], cumulative)
        }
        cumulative += h.buckets[h.buckets.count - 1]
        out.sample("\(name)_bucket", ["le": "+Inf"], cumulative)
        out.line("\(name)_sum \(seconds(UInt64(max(0, h.sumNanoseconds))))")
        out.sample("\(name)_count", [:], cumulative)
    }

    private func seconds(_ ns: UInt64) -> String {
        let whole = ns / 1_000_000_000
        var frac = String(ns % 1_000_000_000)
        frac = String(repeating: "0", count: 9 - frac.count) + frac
        while frac.hasSuffix("0") { frac.removeLast() }
        return frac.isEmpty ? "\(whole)" : "\(whole).\(frac)"
    }
}

/// Builds the exposition text: HELP/TYPE once per family, label values escaped.
public struct MetricsText {
    private(set) var text = ""

    mutating func family(_ name: String, _ type: String, _ help: String) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
    }

    mutating func sample(_ name: String, _ labels: [String: String], _ value: Int64) {
        sample(name, labels, text: "\(value)")
    }

    mutating func sample(_ name: String, _ labels: [String: String], double value: Double) {
        sample(name, labels, text: "\(value)")
    }

    private mutating func sample(_ name: String, _ labels: [String: String], text value: String) {
        text += name
        if !labels.isEmpty {
            text += "{" + labels.sorted { $0.key < $1.key }.map { "\($0.key)=\"\(Self.escape($0.value))\"" }.joined(separator: ",") + "}"
        }
        text += " \(value)\n"
    }

    mutating func line(_ s: String) { text += s + "\n" }

    /// Backslash, double quote, LF and CR escaped (label values; logfmt quoted values). By
    /// scalar: Swift's Characters join "\r\n" into one, which matches neither "\r" nor "\n".
    public static func escape(_ s: String) -> String {
        var out = String.UnicodeScalarView()
        for c in s.unicodeScalars {
            switch c {
            case "\\": out.append(contentsOf: "\\\\".unicodeScalars)
            case "\"": out.append(contentsOf: "\\\"".unicodeScalars)
            case "\n": out.append(contentsOf: "\\n".unicodeScalars)
            case "\r": out.append(contentsOf: "\\r".unicodeScalars)
            default: out.append(c)
            }
        }
        return String(out)
    }
}
