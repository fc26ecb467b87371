import COpenSSL
import Foundation
import CMallocCounter
import Glibc
import Testing
@testable import IgrisTLS

/// After a TLS 1.3 handshake a server session drops OpenSSL's `SSL` and carries the records
/// itself (`TLSSession.protectRecordsItself`); its peer here is an unchanged OpenSSL client.
@Suite struct RecordLayerTests {
    /// A handshaken pair whose server session no longer has an `SSL` object.
    static func compactPair(suite: String = "TLS_AES_128_GCM_SHA256") throws -> (client: TLSSession, server: TLSSession) {
        let (c, s, tickets) = try handshakenServer(suite: suite)
        #expect(s.protectRecordsItself(sent: tickets, received: 0))
        #expect(s.protectsRecordsItself && s.cipher == suite && s.version == "TLSv1.3")
        return (c, s)
    }

    /// A handshaken pair, and the tickets the server sent after its handshake.
    static func handshakenServer(suite: String = "TLS_AES_128_GCM_SHA256") throws -> (client: TLSSession, server: TLSSession, tickets: Int) {
        let server = try TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        #expect(server.protectsRecordsItself)
        let c = try #require(try clientContext().makeSession(host: "localhost"))
        _ = SSL_set_ciphersuites(c.ssl, suite)
        let s = try #require(server.makeSession())
        let tickets = try #require(handshakeFlightByFlight(c, s))
        deliver(s, c)  // the tickets reach the client, as the worker flushes them before the switch
        return (c, s, tickets)
    }

    /// Everything `from` has pending, fed to `to`.
    static func deliver(_ from: TLSSession, _ to: TLSSession) {
        var wire = [UInt8](repeating: 0, count: from.pendingOutput)
        let n = wire.withUnsafeMutableBytes { from.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        wire.withUnsafeBytes { to.feed($0.baseAddress!, count: n) }
    }

    /// `text` written by one session arrives whole at the other.
    static func expectCarried(_ text: String, from: TLSSession, to: TLSSession, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(Array(text.utf8).withUnsafeBytes { from.write($0.baseAddress!, count: $0.count) }, sourceLocation: sourceLocation)
        deliver(from, to)
        #expect(readAll(to, piece: 4096).bytes == Array(text.utf8), sourceLocation: sourceLocation)
    }

    /// Reads `to` dry in pieces of at most `piece` bytes.
    static func readAll(_ s: TLSSession, piece: Int) -> (bytes: [UInt8], end: TLSSession.ReadResult) {
        var out: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: piece)
        while true {
            let r = buffer.withUnsafeMutableBytes { s.read(into: $0.baseAddress!, capacity: piece) }
            guard case .bytes(let n) = r else { return (out, r) }
            out += buffer.prefix(n)
        }
    }

    @Test("bytes both ways through the server's own records, read whole and in small pieces", arguments: [
        "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
    ])
    func bytesBothWays(suite: String) throws {
        let (c, s) = try Self.compactPair(suite: suite)
        let up = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        #expect(up.withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) })
        Self.deliver(c, s)
        let got = Self.readAll(s, piece: 1000)  // smaller than a record: the rest is held
        #expect(got.bytes == up)
        #expect(got.end == .wantInput)
        let down = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 17) }
        #expect(down.withUnsafeBytes { s.write($0.baseAddress!, count: $0.count) })
        Self.deliver(s, c)
        #expect(Self.readAll(c, piece: 65536).bytes == down)
        // A record arriving a byte at a time.
        #expect([UInt8](repeating: 5, count: 300).withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) })
        var wire = [UInt8](repeating: 0, count: c.pendingOutput)
        _ = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        var buffer = [UInt8](repeating: 0, count: 65536)
        for (k, byte) in wire.enumerated() {
            [byte].withUnsafeBytes { s.feed($0.baseAddress!, count: 1) }
            let r = buffer.withUnsafeMutableBytes { s.read(into: $0.baseAddress!, capacity: $0.count) }
            #expect(r == (k == wire.count - 1 ? .bytes(300) : .wantInput))
        }
        // close_notify each way.
        c.shutdown()
        Self.deliver(c, s)
        #expect(Self.readAll(s, piece: 4096).end == .closed)
        s.shutdown()
        #expect(!s.write([1], count: 1))
        Self.deliver(s, c)
        #expect(Self.readAll(c, piece: 4096).end == .closed)
    }

    @Test("a KeyUpdate that asks for ours: both directions rekey and go on")
    func keyUpdate() throws {
        let (c, s) = try Self.compactPair()
        #expect(SSL_key_update(c.ssl, SSL_KEY_UPDATE_REQUESTED) == 1)
        Self.expectCarried("after the update", from: c, to: s)
        #expect(s.pendingOutput > 0)  // our KeyUpdate
        Self.expectCarried("answer", from: s, to: c)
        // The client's own next key is in use too (it rekeyed on sending its update).
        Self.expectCarried("again", from: c, to: s)
    }

    @Test("a flipped byte: bad_record_mac to the peer, and the session fails for good")
    func tampering() throws {
        let (c, s) = try Self.compactPair()
        #expect([UInt8](repeating: 7, count: 1000).withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) })
        var wire = [UInt8](repeating: 0, count: c.pendingOutput)
        let n = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        wire[n - 20] ^= 0x40
        wire.withUnsafeBytes { s.feed($0.baseAddress!, count: n) }
        guard case .failed(let f) = Self.readAll(s, piece: 4096).end else { Issue.record("tampered record read"); return }
        #expect(f.reason == .badRecord)
        #expect(!s.write([1], count: 1))
        Self.deliver(s, c)
        guard case .failed(let alert) = Self.readAll(c, piece: 4096).end else { Issue.record("no alert reached the client"); return }
        #expect(alert.detail.contains("bad record mac"), "\(alert)")
    }

    @Test("after a negotiation through OpenSSL (records counted, fed in odd pieces), the switch carries on from the right sequence numbers")
    func switchAfterNegotiation() throws {
        let (c, s, tickets) = try Self.handshakenServer()
        s.startCountingRecords(sent: tickets)
        // The "request": three records, fed 7 bytes at a time; the "reply": two records.
        for k in 0..<3 {
            #expect([UInt8](repeating: UInt8(k), count: 100 + k).withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) })
        }
        var wire = [UInt8](repeating: 0, count: c.pendingOutput)
        _ = wire.withUnsafeMutableBytes { c.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
        var request: [UInt8] = []
        var offset = 0
        while offset < wire.count {
            let n = min(7, wire.count - offset)
            wire[offset..<offset + n].withUnsafeBytes { s.feed($0.baseAddress!, count: n) }
            offset += n
            request += Self.readAll(s, piece: 4096).bytes
        }
        #expect(request.count == 303)
        #expect(s.countedRecords?.received == 3)
        for text in ["reply one", "reply two"] {
            #expect(Array(text.utf8).withUnsafeBytes { s.write($0.baseAddress!, count: $0.count) })
        }
        Self.deliver(s, c)
        #expect(Self.readAll(c, piece: 4096).bytes == Array("reply onereply two".utf8))
        let counts = try #require(s.countedRecords)
        #expect(counts.sent == tickets + 2)
        #expect(s.protectRecordsItself(sent: counts.sent, received: counts.received))
        Self.expectCarried("bridged up", from: c, to: s)
        Self.expectCarried("bridged down", from: s, to: c)
    }

    @Test("a client whose data follows its Finished mid-record: the switch waits for the record's end, then carries on")
    func switchWaitsForARecordBoundary() throws {
        let server = try TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        let c = try #require(try clientContext().makeSession(host: "localhost"))
        let s = try #require(server.makeSession())
        var wire = [UInt8](repeating: 0, count: 65536)
        func move(_ from: TLSSession, _ to: TLSSession, keep: Int = 0) -> [UInt8] {
            let n = wire.withUnsafeMutableBytes { from.takeOutput(into: $0.baseAddress!, capacity: $0.count) }
            wire.withUnsafeBytes { to.feed($0.baseAddress!, count: n - keep) }
            return Array(wire[n - keep..<n])
        }
        #expect(c.handshake() == .wantInput)
        _ = move(c, s)
        #expect(s.handshake() == .wantInput)
        _ = move(s, c)
        #expect(c.handshake() == .done)
        // The client's Finished and its first record in one flight, of which the server has
        // all but the last 100 bytes when its handshake ends.
        let first = (0..<3000).map { UInt8(truncatingIfNeeded: $0) }
        #expect(first.withUnsafeBytes { c.write($0.baseAddress!, count: $0.count) })
        let rest = move(c, s, keep: 100)
        let queued = s.pendingOutput
        #expect(s.handshake() == .done)
        let tickets = try #require(s.pendingRecords(from: queued))
        Self.deliver(s, c)
        s.startCountingRecords(sent: tickets)
        #expect(Self.readAll(s, piece: 65536).bytes.isEmpty)
        #expect(!s.protectRecordsWhenAligned())  // mid-record: OpenSSL carries on
        rest.withUnsafeBytes { s.feed($0.baseAddress!, count: $0.count) }
        #expect(Self.readAll(s, piece: 65536).bytes == first)
        #expect(s.protectRecordsWhenAligned())
        Self.expectCarried("next", from: c, to: s)
        Self.expectCarried("back", from: s, to: c)
    }

    @Test("a client session (upstream_tls) switches once the server's ticket is in, and both ways carry on")
    func clientSwitchesAfterTheTicket() throws {
        let server = try TLSServerContext(TLSServerSettings(certificate: Certificates.files("server")))
        let client = try clientContext()
        #expect(client.settings.protectRecordsItself)
        let c = try #require(client.makeSession(host: "localhost"))
        let s = try #require(server.makeSession())
        let tickets = try #require(handshakeFlightByFlight(c, s))
        c.startCountingRecords(sent: 0)
        #expect(!c.protectRecordsWhenAligned())  // no ticket yet: later connections resume with it
        Self.deliver(s, c)
        #expect(Self.readAll(c, piece: 4096).end == .wantInput)  // the ticket, no data
        #expect(c.protectRecordsWhenAligned())
        #expect(c.protectsRecordsItself && tickets >= 1)
        Self.expectCarried("up", from: c, to: s)
        Self.expectCarried("down", from: s, to: c)
    }

    @Test("record boundaries are followed through pieces of any size")
    func recordBoundaries() {
        // Records of 3, 0 and 300 body bytes.
        var stream: [UInt8] = [23, 3, 3, 0, 3, 1, 2, 3, 23, 3, 3, 0, 0, 23, 3, 3, 1, 44]
        stream += [UInt8](repeating: 9, count: 300)
        for piece in [1, 2, 5, 7, 100, stream.count] {
            var b = RecordBoundary()
            var started = 0
            var offset = 0
            while offset < stream.count {
                let n = min(piece, stream.count - offset)
                started += stream[offset..<offset + n].withUnsafeBytes { b.consume($0.baseAddress!, n) }
                offset += n
            }
            #expect(started == 3 && b.atBoundary, "pieces of \(piece)")
        }
        var partial = RecordBoundary()
        #expect(stream.prefix(10).withUnsafeBytes { partial.consume($0.baseAddress!, 10) } == 2)
        #expect(!partial.atBoundary)
    }

    /// Under a sanitizer (IGRIS_SANITIZED) the sanitizer owns malloc, and mallinfo2 counts nothing.
    #if IGRIS_SANITIZED
    static let heapCounted = false
    #else
    static let heapCounted = true
    #endif

    @Test("switching 20 idle server sessions gives back at least 8 KiB each (malloc's own count)",
          .enabled(if: heapCounted, "a sanitizer owns malloc in this build"))
    func switchingFreesMemory() throws {
        var pairs: [(client: TLSSession, server: TLSSession, tickets: Int)] = []
        for _ in 0..<20 { pairs.append(try Self.handshakenServer()) }
        for p in pairs { p.server.releaseMemory(threshold: 0) }
        let before = igris_heap_in_use()
        for p in pairs {
            #expect(p.server.protectRecordsItself(sent: p.tickets, received: 0))
            p.server.releaseMemory(threshold: 0)
        }
        let after = igris_heap_in_use()
        let freedEach = (Int(before) - Int(after)) / pairs.count
        #expect(freedEach >= 8 * 1024, "\(freedEach) bytes given back per session")
        for p in pairs {
            #expect(!p.server.hasBufferedInput && p.server.pendingOutput == 0)
            Self.expectCarried("still works", from: p.client, to: p.server)
        }
    }
}
