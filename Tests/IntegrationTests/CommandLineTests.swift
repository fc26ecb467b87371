import Foundation
import Glibc
import IgrisEngine
import Testing

/// `igris` as an operator runs it: bad input → one line on stderr, non-zero exit.
@Suite("igris command line", .serialized)
struct CommandLineTests {
    let igris = productPath("igris")

    private func expectOneLineError(_ arguments: [String], contains text: String, via prefix: [String] = [],
                                    sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = prefix.isEmpty
            ? try runCommand(igris, arguments)
            : try runCommand(prefix[0], Array(prefix.dropFirst()) + [igris] + arguments)
        #expect(result.status != 0, "exit status 0 for \(arguments)", sourceLocation: sourceLocation)
        let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: true)
        #expect(lines.count == 1, "stderr was: \(result.stderr)", sourceLocation: sourceLocation)
        #expect(lines.first?.hasPrefix("igris: ") == true, "stderr was: \(result.stderr)", sourceLocation: sourceLocation)
        #expect(result.stderr.contains(text), "stderr was: \(result.stderr)", sourceLocation: sourceLocation)
        #expect(!result.stderr.contains("Fatal error"), sourceLocation: sourceLocation)
    }

    @Test func unknownFlag() throws {
        try expectOneLineError(["serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--bogus"], contains: "Unknown option '--bogus'")
    }

    @Test func malformedAddress() throws {
        try expectOneLineError(["--listen", "127.0.0.1", "--upstream", "127.0.0.1:1"], contains: "malformed address '127.0.0.1'")
        try expectOneLineError(["--listen", "127.0.0.1:70000", "--upstream", "127.0.0.1:1"], contains: "port must be a number")
        try expectOneLineError(["--listen", "::1:80", "--upstream", "127.0.0.1:1"], contains: "need brackets")
    }

    @Test func portInUse() throws {
        let (fd, bound) = try listeningSocket("127.0.0.1:0", backlog: 1)
        defer { Glibc.close(fd) }
        let port = bound.port
        try expectOneLineError(["--listen", "127.0.0.1:\(port)", "--upstream", "127.0.0.1:1"],
                               contains: "cannot listen on 127.0.0.1:\(port): Address already in use")
    }

    @Test func permissionDenied() throws {
        // Root may bind anywhere; drop CAP_NET_BIND_SERVICE (setpriv, util-linux) to be an
        // ordinary process for whom ports below 1024 are privileged.
        try expectOneLineError(["--listen", "127.0.0.1:81", "--upstream", "127.0.0.1:1"],
                               contains: "cannot listen on 127.0.0.1:81: Permission denied",
                               via: ["/usr/bin/setpriv", "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service"])
    }

    @Test func unresolvableUpstream() throws {
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "no-such-host.invalid:80"],
                               contains: "cannot resolve 'no-such-host.invalid:80'")
    }

    @Test func unequalListenAndUpstream() throws {
        try expectOneLineError(["--listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"],
                               contains: "2 --listen but 1 --upstream")
        try expectOneLineError(["serve"], contains: "nothing to listen on")
    }

    @Test("gateway flags: missing users file, bad ACL rules and contradictions are one-line errors")
    func gatewayFlagErrors() throws {
        try expectOneLineError(["--socks5", "127.0.0.1:0"], contains: "--socks5/--http-connect need --users FILE, or --no-auth")
        try expectOneLineError(["--http-connect", "127.0.0.1:0", "--users", "/nonexistent/users.yaml"],
                               contains: "users file /nonexistent/users.yaml: cannot read")
        try expectOneLineError(["--socks5", "127.0.0.1:0", "--no-auth", "--allow", "127.0.0.1:80"], contains: "bad ACL rule '127.0.0.1:80'")
        try expectOneLineError(["--socks5", "127.0.0.1:0", "--no-auth", "--deny", "10.0.0.0/8:99999"], contains: "bad ACL rule")
        try expectOneLineError(["--socks5", "127.0.0.1:0", "--no-auth", "--users", "u.yaml"], contains: "contradict")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--no-auth"], contains: "none is given")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--max-handshakes-per-source=-3"],
                               contains: "--max-handshakes-per-source must be 0 (no limit) or more")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--upstream-source", "192.0.2.1"],
                               contains: "--upstream-source: 192.0.2.1 is not an address of this host")
        try expectOneLineError(["--socks5", "127.0.0.1:0", "--no-auth", "--upstream-source", "127.0.0.2"], contains: "--upstream-source applies to --upstream")
        let bad = try writeTemporaryFile("users:\n  - name: alice\n    password_hash: plain\n")
        defer { unlink(bad) }
        try expectOneLineError(["--socks5", "127.0.0.1:0", "--users", bad], contains: "\(bad):3: users[0].password_hash: not an argon2id hash")
    }

    @Test("igris passwd makes a hash that igris serve --users accepts; curl authenticates through it", arguments: engineBackends)
    func passwdAndServe(backend: BackendChoice) throws {
        // What `igris passwd --user alice > users.yaml` writes is a users file on its own; a
        // second user's --entry appends to it.
        let (status, file, stderr) = try runShell("printf 'hunter2\\n' | \(igris) passwd --user alice")
        #expect(status == 0, "\(stderr)")
        #expect(file.hasPrefix("users:\n") && file.contains("password_hash: \"$argon2id$v=19$"), "\(file)")
        let (_, entry, _) = try runShell("printf 'other\\n' | \(igris) passwd --user bob --entry")
        #expect(!entry.contains("users:"))
        let users = try writeTemporaryFile(file + entry)
        defer { unlink(users) }
        let config = try writeTemporaryFile("users_file: \(users)\nlisteners:\n  - {name: s, listen: \"127.0.0.1:0\", mode: socks5, auth: password}\n")
        defer { unlink(config) }
        #expect(try runCommand(igris, ["check", "-c", config]).status == 0)
        // Writable by others: anyone could add a user. Refused, with the reason.
        chmod(users, 0o666)
        let refused = try runCommand(igris, ["serve", "--socks5", "127.0.0.1:0", "--users", users])
        #expect(refused.status != 0 && refused.stderr.contains("writable by its group or by others (mode 666)"), "\(refused.stderr)")
        chmod(users, 0o600)
        let files = try FileServer(size: 100_000)
        defer { files.stop() }
        let port = try unusedPort()
        let child = try ChildProcess(igris, ["--socks5", "127.0.0.1:\(port)", "--users", users, "--allow", "127.0.0.1/32:\(files.port)",
                                             "--backend", backend.rawValue, "--workers", "1"])
        defer { child.terminate() }
        #expect(waitUntilAccepting("127.0.0.1:\(port)"))
        let good = try curl(["-x", "socks5h://alice:hunter2@127.0.0.1:\(port)", "http://127.0.0.1:\(files.port)/blob"])
        #expect(good.status == 0 && good.digest == files.digest, "\(good.stderr)")
        let bad = try curl(["-x", "socks5h://alice:hunter3@127.0.0.1:\(port)", "http://127.0.0.1:\(files.port)/blob"])
        #expect(bad.status == 97)
        // A name with CR LF in it can't split the log line that names it.
        #expect(throws: TestFailure.self) {
            _ = try Socks5Client.connect(try SocketAddress.resolve("127.0.0.1:\(port)"), to: .ipv4(127, 0, 0, 1), port: files.port,
                                         credentials: ("ev\r\nil forged=1", "x"))
        }
        child.signal(SIGTERM)
        let (exit, log) = child.finish()
        #expect(exit == 0)
        #expect(log.contains("authentication failed") && log.contains("reason=wrong password"), "\(log)")
        #expect(log.contains("user=\"alice\""), "the name tried is logged: \(log)")
        #expect(log.contains(#"user="ev\r\nil forged=1""#) && !log.contains("\nil forged=1"), "escaped: \(log)")
        #expect(!log.contains("hunter"), "passwords never reach the log")
    }

    @Test("max_connections defaults to what RLIMIT_NOFILE allows: no warning; one set too high is warned about")
    func descriptorDefault() throws {
        for (extra, warned) in [([String](), false), (["--max-connections", "65536"], true)] {
            let child = try ChildProcess("/usr/bin/prlimit", ["--nofile=4096:4096", igris, "serve", "--listen", "127.0.0.1:0",
                                                              "--upstream", "127.0.0.1:1", "--workers", "1"] + extra)
            defer { child.terminate() }
            let log = LogLines(child)
            #expect(log.wait(for: "forwarding"))
            child.signal(SIGTERM)
            #expect(log.wait(for: "stopped"))
            #expect(log.lines.value.contains { $0.contains("RLIMIT_NOFILE is 4096") } == warned, "\(extra): \(log.lines.value)")
        }
    }

    @Test func badNumbers() throws {
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--buffers", "300"], contains: "power of two")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--backend", "kqueue"], contains: "kqueue")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--connect-timeout", "soon"], contains: "soon")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--listen-backlog", "0"], contains: "--listen-backlog must be between 1 and 65535")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--busy-poll", "5s"], contains: "--busy-poll must be at most 1s")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--busy-poll", "eager"], contains: "eager")
        try expectOneLineError(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--backend", "epoll", "--direct-descriptors"],
                               contains: "direct descriptors need the io_uring backend")
    }

    @Test("SIGTERM: stop accepting, let the open transfer finish, exit 0", arguments: engineBackends)
    func sigtermDrains(backend: BackendChoice) throws {
        let reply = 4 << 20
        let upstream = try answeringUpstream(seed: 11, count: reply)
        defer { upstream.stop() }
        let port = try unusedPort()
        let child = try ChildProcess(igris, ["--listen", "127.0.0.1:\(port)", "--upstream", "\(upstream.address)",
                                             "--backend", backend.rawValue, "--workers", "2", "--drain-timeout", "20s"])
        defer { child.terminate() }
        let address = try SocketAddress.resolve("127.0.0.1:\(port)")
        var client: TestSocket?
        for _ in 0..<500 where client == nil {
            client = try? TestSocket.connect(address)
            if client == nil { usleep(10_000) }
        }
        let c = try #require(client, "igris never listened on \(port)")
        c.setReceiveTimeout(seconds: 20)
        _ = sendPattern(c, seed: 10, count: 1 << 20)
        #expect(upstream.accepted.value <= 1)

        child.signal(SIGTERM)
        // Accepting stops: connects are refused once the listeners are closed.
        var refused = false
        for _ in 0..<500 {
            if let probe = try? TestSocket.connect(address) {
                probe.close()
                usleep(10_000)
            } else {
                refused = true
                break
            }
        }
        #expect(refused, "still accepting after SIGTERM")

        // The open bridge keeps working until both sides are done.
        _ = sendPattern(c, seed: 12, count: 1 << 20)
        c.shutdownWrite()
        let r = receiveDigest(c)
        c.close()
        #expect(r.error == nil)
        #expect(r.received == reply)
        #expect(r.digest == patternDigest(seed: 11, count: reply))
        let result = child.finish(timeout: 20)
        #expect(result.status == 0, "igris exited \(result.status): \(result.stderr)")
        #expect(result.stderr.contains("draining"))
        #expect(result.stderr.contains("backend=\(backend.rawValue)"))
    }

    @Test func probeReportsBackend() throws {
        let child = try ChildProcess(igris, ["probe"])
        let out = String(decoding: child.stdout.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        let result = child.finish()
        #expect(result.status == 0)
        #expect(out.contains("io_uring: "))
        #expect(out.contains("--backend auto would use: "))
        // Each opcode and setup flag igris uses, and the limits that bound connections.
        for line in ["opcode ACCEPT: yes", "opcode POLL_ADD: yes", "opcode SEND_ZC: ", "setup SINGLE_ISSUER|DEFER_TASKRUN: ", "setup COOP_TASKRUN: ",
                     "feature NODROP: ", "kernel.io_uring_disabled: ", "fs.pipe-max-size: ", "fs.pipe-user-pages-soft: ",
                     "net.ipv4.ip_local_port_range: ", "RLIMIT_NOFILE: soft ", "RLIMIT_MEMLOCK: ",
                     "bridges at most, ", "io_uring --direct-descriptors: "] {
            #expect(out.contains(line), "probe lacks '\(line)'")
        }
    }
}
