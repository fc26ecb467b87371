import Foundation
import Testing
@testable import IgrisTLS

/// Certificates made once per test process by Tests/fixtures/make-certs.sh, removed when it exits.
enum Certificates {
    static let directory: String = {
        let dir = NSTemporaryDirectory() + "igris-tls-unit-\(getpid())"
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("fixtures/make-certs.sh").path
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = [script, dir]
        try! p.run()
        p.waitUntilExit()
        precondition(p.terminationStatus == 0, "make-certs.sh failed")
        atexit { try? FileManager.default.removeItem(atPath: Certificates.directory) }
        return dir
    }()

    static func path(_ name: String) -> String { directory + "/" + name }
    static func files(_ name: String) -> TLSCertificateFiles { TLSCertificateFiles(certificate: path("\(name).pem"), key: path("\(name).key")) }
}

/// Moves records between two sessions until neither has anything to send.
func pump(_ a: TLSSession, _ b: TLSSession) {
    var buffer = [UInt8](repeating: 0, count: 65536)
    for _ in 0..<32 {
        var moved = false
        for (from, to) in [(a, b), (b, a)] {
            let n = buffer.withUnsafeMutableBytes { from.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
            if n > 0 {
                buffer.withUnsafeBytes { to.feed($0.baseAddress!, count: n) }
                moved = true
            }
        }
        _ = a.handshakeDone ? .done : a.handshake()
        _ = b.handshakeDone ? .done : b.handshake()
        if !moved && a.pendingOutput == 0 && b.pendingOutput == 0 { break }
    }
}

/// Runs a handshake; the step each side ended in.
func handshake(_ client: TLSSession, _ server: TLSSession) -> (client: TLSSession.HandshakeStep, server: TLSSession.HandshakeStep) {
    var c = client.handshake()
    var s = TLSSession.HandshakeStep.wantInput
    var buffer = [UInt8](repeating: 0, count: 65536)
    for _ in 0..<16 {
        for (from, to) in [(client, server), (server, client)] {
            let n = buffer.withUnsafeMutableBytes { from.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
            if n > 0 { buffer.withUnsafeBytes { to.feed($0.baseAddress!, count: n) } }
        }
        if s != .done { s = server.handshake() }
        if c != .done { c = client.handshake() }
        if case .failed = s { break }
        if case .failed = c { break }
        if c == .done && s == .done && server.pendingOutput == 0 && client.pendingOutput == 0 { break }
    }
    // A failing side's alert reaches the other.
    for (from, to) in [(client, server), (server, client)] {
        let n = buffer.withUnsafeMutableBytes { from.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        if n > 0 { buffer.withUnsafeBytes { to.feed($0.baseAddress!, count: n) } }
    }
    if c == .wantInput { c = client.handshake() }
    if s == .wantInput { s = server.handshake() }
    return (c, s)
}

func send(_ bytes: [UInt8], from: TLSSession, to: TLSSession) -> [UInt8] {
    #expect(bytes.withUnsafeBytes { from.write($0.baseAddress!, count: $0.count) })
    var wire = [UInt8](repeating: 0, count: bytes.count + 4096)
    let n = wire.withUnsafeMutableBytes { from.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
    wire.withUnsafeBytes { to.feed($0.baseAddress!, count: n) }
    var out = [UInt8](repeating: 0, count: bytes.count + 16)
    var got = 0
    while true {
        let r = out.withUnsafeMutableBytes { to.read(into: $0.baseAddress! + got, capacity: $0.count - got) }
        guard case .bytes(let k) = r else { break }
        got += k
    }
    return Array(out.prefix(got))
}

/// A client session and one of `server`'s, their handshake run (its steps not checked).
func handshakenPair(_ server: TLSServerContext) throws -> (client: TLSSession, server: TLSSession) {
    let c = try #require(try clientContext().makeSession(host: "localhost"))
    let s = try #require(server.makeSession())
    _ = handshake(c, s)
    return (c, s)
}

/// Runs a TLS 1.3 handshake one flight at a time, to see the server's last step: the tickets
/// it queues once the client's Finished is in (their count, nil when they end mid-record).
/// Those tickets stay in the server's output.
func handshakeFlightByFlight(_ c: TLSSession, _ s: TLSSession) -> Int? {
    var wire = [UInt8](repeating: 0, count: 65536)
    func move(_ from: TLSSession, _ to: TLSSession) {
        let n = wire.withUnsafeMutableBytes { from.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        wire.withUnsafeBytes { to.feed($0.baseAddress!, count: n) }
    }
    #expect(c.handshake() == .wantInput)   // ClientHello
    move(c, s)
    #expect(s.handshake() == .wantInput)   // ServerHello … Finished
    move(s, c)
    #expect(c.handshake() == .done)        // client Finished
    move(c, s)
    let queued = s.pendingOutput
    #expect(s.handshake() == .done)        // the tickets
    return s.pendingRecords(from: queued)
}

func clientContext(ca: String = Certificates.path("ca.pem"), certificate: String? = nil, minVersion: TLSVersion = .tls12,
                   serverName: String? = nil) throws -> TLSClientContext {
    var s = TLSClientSettings()
    s.ca = ca
    s.serverName = serverName
    s.minVersion = minVersion
    if let certificate { s.certificate = Certificates.files(certificate) }
    return try TLSClientContext(s)
}

@Suite struct TLSSessionTests {
    @Test func handshakeAndBytesBothWaysThenCloseNotify() throws {
        let server = try TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        let client = try clientContext()
        let c = try #require(client.makeSession(host: "localhost"))
        let s = try #require(server.makeSession())
        let (cs, ss) = handshake(c, s)
        #expect(cs == .done)
        #expect(ss == .done)
        #expect(s.version == "TLSv1.3")
        #expect(s.cipher.hasPrefix("TLS_"))
        // 200 KiB one way, spanning many records and more than one output chunk.
        let big = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        #expect(send(big, from: c, to: s) == big)
        #expect(send(Array("pong".utf8), from: s, to: c) == Array("pong".utf8))
        c.shutdown()
        var wire = [UInt8](repeating: 0, count: 512)
        let n = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        #expect(n > 0)
        wire.withUnsafeBytes { s.feed($0.baseAddress!, count: n) }
        let r = wire.withUnsafeMutableBytes { s.read(into: $0.baseAddress!, capacity: $0.count) }
        #expect(r == .closed)
    }

    @Test func serverCertificateIsVerified() throws {
        let server = try TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        // Wrong CA: the client refuses the server.
        let rogue = try clientContext(ca: Certificates.path("rogue-ca.pem"))
        var (cs, _) = handshake(try #require(rogue.makeSession(host: "localhost")), try #require(server.makeSession()))
        guard case .failed(let f) = cs else { Issue.record("handshake with an unknown CA: \(cs)"); return }
        #expect(f.reason == .serverCertificate)
        // Wrong name: the certificate is for localhost.
        let named = try clientContext(serverName: "example.org")
        (cs, _) = handshake(try #require(named.makeSession(host: "127.0.0.1")), try #require(server.makeSession()))
        guard case .failed(let g) = cs else { Issue.record("handshake with the wrong name: \(cs)"); return }
        #expect(g.reason == .serverCertificate)
        // The address as the name: the certificate holds IP:127.0.0.1.
        (cs, _) = handshake(try #require(try clientContext().makeSession(host: "127.0.0.1")), try #require(server.makeSession()))
        #expect(cs == .done)
    }

    @Test func sniPicksTheCertificateAndUnknownNamesAreRefusedWithoutADefault() throws {
        var settings = TLSServerSettings()
        settings.sniCertificates = [Certificates.files("server"), Certificates.files("other")]
        let server = try TLSServerContext(settings)
        for host in ["localhost", "other.test", "x.wild.test"] {
            let (cs, ss) = handshake(try #require(try clientContext().makeSession(host: host)), try #require(server.makeSession()))
            #expect(cs == .done, "\(host)")
            #expect(ss == .done, "\(host)")
        }
        let (_, ss) = handshake(try #require(try clientContext(serverName: "nobody.test").makeSession(host: "")), try #require(server.makeSession()))
        guard case .failed(let f) = ss else { Issue.record("unknown name: \(ss)"); return }
        #expect(f.reason == .unknownName)
        // With a default certificate, an unknown name gets it.
        settings.defaultCertificate = Certificates.files("server")
        settings.sniCertificates = [Certificates.files("other")]
        let lenient = try TLSServerContext(settings)
        let (cs2, ss2) = handshake(try #require(try clientContext(serverName: "localhost").makeSession(host: "")), try #require(lenient.makeSession()))
        #expect(cs2 == .done)
        #expect(ss2 == .done)
    }

    @Test func clientCertificatesNameUsersAndOthersAreRefused() throws {
        var settings = TLSServerSettings(certificate: Certificates.files("server"))
        settings.clientCA = Certificates.path("ca.pem")
        settings.crl = Certificates.path("crl.pem")
        let server = try TLSServerContext(settings)
        let s = try #require(server.makeSession())
        let (cs, ss) = handshake(try #require(try clientContext(certificate: "alice").makeSession(host: "localhost")), s)
        #expect(cs == .done)
        #expect(ss == .done)
        #expect(s.peerName(subjectAltName: false) == "alice")
        #expect(s.peerName(subjectAltName: true) == "alice@example.test")
        for (who, certificate) in [("another CA", Optional("mallory")), ("revoked", "bob"), ("no certificate", nil)] {
            let (_, refused) = handshake(try #require(try clientContext(certificate: certificate).makeSession(host: "localhost")), try #require(server.makeSession()))
            guard case .failed(let f) = refused else { Issue.record("\(who): \(refused)"); continue }
            #expect(f.reason == .clientCertificate, "\(who): \(f)")
        }
    }

    @Test func versionFloorAndPlaintextAndTampering() throws {
        var settings = TLSServerSettings(certificate: Certificates.files("server"))
        settings.minVersion = .tls13
        let server = try TLSServerContext(settings)
        // A client that stops at TLS 1.2.
        var oldSettings = TLSClientSettings()
        oldSettings.ca = Certificates.path("ca.pem")
        oldSettings.maxVersion = .tls12
        let c = try #require(try TLSClientContext(oldSettings).makeSession(host: "localhost"))
        let (_, ss) = handshake(c, try #require(server.makeSession()))
        guard case .failed(let f) = ss else { Issue.record("TLS 1.2 client: \(ss)"); return }
        #expect(f.reason == .version)

        let s = try #require(server.makeSession())
        let http = Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        http.withUnsafeBytes { s.feed($0.baseAddress!, count: $0.count) }
        guard case .failed(let p) = s.handshake() else { Issue.record("plaintext accepted"); return }
        #expect(p.reason == .plaintext)

        // A flipped byte in an application record: bad_record_mac, never plaintext.
        let (c2, s2) = try handshakenPair(server)
        let data = [UInt8](repeating: 7, count: 1000)
        _ = data.withUnsafeBytes { c2.write($0.baseAddress!, count: $0.count) }
        var wire = [UInt8](repeating: 0, count: 2000)
        let n = wire.withUnsafeMutableBytes { c2.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        wire[n - 20] ^= 0x40
        wire.withUnsafeBytes { s2.feed($0.baseAddress!, count: n) }
        let r = wire.withUnsafeMutableBytes { s2.read(into: $0.baseAddress!, capacity: $0.count) }
        guard case .failed(let b) = r else { Issue.record("tampered record read as \(r)"); return }
        #expect(b.reason == .badRecord)
    }

    @Test func configurationErrorsNameTheFile() throws {
        func error(_ settings: TLSServerSettings) -> String {
            do { _ = try TLSServerContext(settings); return "" } catch { return error.description }
        }
        #expect(error(TLSServerSettings(certificate: TLSCertificateFiles(certificate: "/nonexistent.pem", key: Certificates.path("server.key"))))
            == "certificate /nonexistent.pem: No such file or directory")
        #expect(error(TLSServerSettings(certificate: TLSCertificateFiles(certificate: Certificates.path("server.pem"), key: Certificates.path("alice.key"))))
            == "key \(Certificates.path("alice.key")) does not match certificate \(Certificates.path("server.pem"))")
        #expect(error(TLSServerSettings(certificate: Certificates.files("expired"))).hasPrefix("certificate \(Certificates.path("expired.pem")): expired "))
        var bad = TLSServerSettings(certificate: Certificates.files("server"))
        bad.clientCA = Certificates.path("server.key")
        #expect(error(bad).hasPrefix("client_ca \(Certificates.path("server.key")): does not parse"))
        #expect(error(TLSServerSettings(certificate: TLSCertificateFiles(certificate: Certificates.path("ca.cnf"), key: Certificates.path("server.key"))))
            == "certificate \(Certificates.path("ca.cnf")): not a PEM certificate")
    }
}

import COpenSSL

@Suite struct KernelTLSKeyTests {
    /// What the kernel would be given: keys derived from the traffic secrets and the record
    /// counts each way. Checked by opening the next real record with them, as the kernel would
    /// (this machine's kernel has no kTLS to try them on).
    @Test(arguments: ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
    func keysAndSequenceNumbersOpenTheNextRecords(suite: String) throws {
        var settings = TLSServerSettings(certificate: Certificates.files("server"))
        settings.exposeTrafficKeys = true
        let server = try TLSServerContext(settings)
        var clientSettings = TLSClientSettings()
        clientSettings.ca = Certificates.path("ca.pem")
        let c = try #require(try TLSClientContext(clientSettings).makeSession(host: "localhost"))
        _ = SSL_set_ciphersuites(c.ssl, suite)
        let s = try #require(server.makeSession())
        let tickets = try #require(handshakeFlightByFlight(c, s))
        var wire = [UInt8](repeating: 0, count: 65536)
        #expect(tickets == 1)
        #expect(s.cipher == suite)
        let transmit = try #require(s.kernelKeys(sending: true))
        let receive = try #require(s.kernelKeys(sending: false))
        #expect(s.holdsNoInput)

        func open(_ keys: KernelTLS.Keys, sequence: UInt64, _ record: [UInt8]) -> (String, Int32)? {
            var out = [UInt8](repeating: 0, count: record.count)
            var type: Int32 = 0
            let n = igris_tls13_open_record(keys.cipher, keys.key, keys.key.count, keys.iv, sequence, record, record.count, &out, &type)
            return n < 0 ? nil : (String(decoding: out.prefix(n), as: UTF8.self), type)
        }
        // Server → client: the first record after the tickets carries sequence number 1.
        let text = Array("from the server".utf8)
        _ = s.takeOutput(into: &wire, capacity: wire.count)  // the tickets, as flushed before the hand-off
        #expect(text.withUnsafeBytes { s.write($0.baseAddress!, count: $0.count) })
        let recordLength = wire.withUnsafeMutableBytes { s.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        let record = Array(wire.prefix(recordLength))
        #expect(open(transmit, sequence: UInt64(tickets), record)?.0 == "from the server")
        #expect(open(transmit, sequence: 0, record) == nil)
        // Client → server: the client's first application record is number 0.
        let ping = Array("from the client".utf8)
        #expect(ping.withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) })
        let clientLength = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        let clientRecord = Array(wire.prefix(clientLength))
        #expect(KernelTLS.wholeRecords(clientRecord.withUnsafeBytes { $0 }) == 1)
        let opened = open(receive, sequence: 0, clientRecord)
        #expect(opened?.0 == "from the client" && opened?.1 == 23)
    }

    @Test func recordCounting() {
        let two: [UInt8] = [23, 3, 3, 0, 2, 9, 9, 23, 3, 3, 0, 1, 7]
        #expect(two.withUnsafeBytes { KernelTLS.wholeRecords($0) } == 2)
        #expect(two.dropLast().withUnsafeBytes { KernelTLS.wholeRecords($0) } == nil)
        #expect([UInt8]().withUnsafeBytes { KernelTLS.wholeRecords($0) } == 0)
    }

    @Test func probeSaysWhy() {
        let support = KernelTLS.support
        #expect(!support.reason.isEmpty)
        // A context only captures secrets (and the engine only hands off) where kTLS is there.
        let context = try? TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        #expect(context?.offloadsToKernel == support.available)
    }
}

@Suite struct InPlaceInputTests {
    /// Ciphertext decrypted where it was received, in chunks that split records anywhere
    /// (as recvs do), comes out whole and in order — the case the spare buffer is for.
    @Test(arguments: [47 * 1024, 16_000, 5_000, 1_000, 17])
    func decryptsInTheReceivedBufferWhateverTheSplit(chunk: Int) throws {
        let server = try TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        let (c, s) = try handshakenPair(server)
        #expect(s.useInPlaceInput(readBufferLength: 65536 + 18 * 1024))
        let data = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) }
        _ = data.withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) }
        var wire = [UInt8](repeating: 0, count: 400_000)
        let total = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        var offset = 0
        var buffer = [UInt8](repeating: 0, count: 65536)
        var spare = [UInt8](repeating: 0, count: 16384)
        var plain: [UInt8] = []
        while offset < total {
            let n = min(chunk, total - offset)
            buffer.withUnsafeMutableBytes { b in wire.withUnsafeBytes { b.baseAddress!.copyMemory(from: $0.baseAddress! + offset, byteCount: n) } }
            buffer.withUnsafeMutableBytes { s.feed($0.baseAddress!, count: n) }
            let r = buffer.withUnsafeMutableBytes { b in
                spare.withUnsafeMutableBytes { s.read(into: b.baseAddress!, capacity: b.count, spare: $0.baseAddress!, spareCapacity: $0.count) }
            }
            switch r {
            case .bytes(let k): plain += buffer.prefix(k)
            case .wantInput: break
            default: Issue.record("chunk \(chunk) at \(offset): \(r)"); return
            }
            offset += n
        }
        #expect(plain == data)
    }
}

extension InPlaceInputTests {
    /// Releasing memory must leave in-place input alone: a handshake's bytes counted toward
    /// trimming once made it swap a memory BIO in under the in-place reader (a crash).
    @Test func releasingMemoryKeepsInPlaceInput() throws {
        let server = try TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        let (c, s) = try handshakenPair(server)
        // More than the trim threshold fed before the switch.
        let early = [UInt8](repeating: 3, count: 10_000)
        _ = early.withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) }
        var wire = [UInt8](repeating: 0, count: 20_000)
        var n = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        wire.withUnsafeBytes { s.feed($0.baseAddress!, count: n) }
        var out = [UInt8](repeating: 0, count: 20_000)
        #expect(out.withUnsafeMutableBytes { s.read(into: $0.baseAddress!, capacity: $0.count) } == .bytes(10_000))
        #expect(s.useInPlaceInput(readBufferLength: 82 * 1024))
        s.releaseMemory()
        s.releaseMemory(threshold: 0)
        _ = early.withUnsafeBytes { c.write($0.baseAddress!, count: 100) }
        n = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        wire.withUnsafeMutableBytes { s.feed($0.baseAddress!, count: n) }
        #expect(wire.withUnsafeMutableBytes { s.read(into: $0.baseAddress!, capacity: $0.count) } == .bytes(100))
        #expect(s.inPlace)
    }
}
