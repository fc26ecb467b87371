import Testing
@testable import IgrisProtocols

/// Feeds `bytes` in pieces of `chunk` bytes (1 = split at every byte), collecting every
/// event that is not `.needMore`, as the worker does: after a message, the rest of the
/// input is fed again.
func collect(_ handshake: inout Socks5ServerHandshake, _ bytes: [UInt8], chunk: Int,
             answer: (inout Socks5ServerHandshake, Socks5ServerHandshake.Event) -> Void = { _, _ in }) -> (events: [Socks5ServerHandshake.Event], consumed: Int) {
    var events: [Socks5ServerHandshake.Event] = []
    var offset = 0
    var consumedTotal = 0
    while offset < bytes.count {
        let end = min(bytes.count, offset + chunk)
        var start = offset
        while start < end {
            let (consumed, event) = bytes[start..<end].withUnsafeBytes { handshake.feed($0) }
            start += consumed
            consumedTotal += consumed
            if event != .needMore {
                events.append(event)
                answer(&handshake, event)
                if case .failure = event { return (events, consumedTotal) }
                if case .request = event { return (events, consumedTotal) }
            }
            if consumed == 0 { break }
        }
        offset = end
    }
    return (events, consumedTotal)
}

@Suite("SOCKS5 codec")
struct Socks5CodecTests {
    static let greeting: [UInt8] = [5, 2, 0, 2]
    static let credentials: [UInt8] = [1, 5] + Array("alice".utf8) + [6] + Array("secret".utf8)
    static let requestIPv4: [UInt8] = [5, 1, 0, 1, 127, 0, 0, 1, 0x1F, 0x40]
    static let requestDomain: [UInt8] = [5, 1, 0, 3, 11] + Array("example.org".utf8) + [0x01, 0xBB]
    static let requestIPv6: [UInt8] = [5, 1, 0, 4] + [UInt8](repeating: 0, count: 15) + [1] + [0, 80]

    static func selectPassword(_ h: inout Socks5ServerHandshake, _ e: Socks5ServerHandshake.Event) {
        switch e {
        case .greeting: h.select(.usernamePassword)
        case .credentials: h.authenticated()
        default: break
        }
    }

    @Test("a whole pipelined handshake, split at every byte and in one piece", arguments: [1, 2, 3, 7, 1000])
    func pipelined(chunk: Int) {
        var h = Socks5ServerHandshake()
        let trailing: [UInt8] = Array("GET / HTTP/1.1\r\n".utf8)
        let bytes = Self.greeting + Self.credentials + Self.requestDomain + trailing
        let (events, consumed) = collect(&h, bytes, chunk: chunk, answer: Self.selectPassword)
        #expect(events == [
            .greeting(methods: [0, 2]),
            .credentials(username: Array("alice".utf8), password: Array("secret".utf8)),
            .request(Socks5.Request(command: .connect, address: .domain("example.org"), port: 443)),
        ])
        // Bytes after the request are the tunnel's, never the codec's.
        #expect(consumed == bytes.count - trailing.count)
        #expect(h.phase == .finished)
    }

    @Test("IPv4 and IPv6 destinations, no authentication", arguments: [1, 100])
    func addressTypes(chunk: Int) {
        for (request, address, port) in [(Self.requestIPv4, Socks5.Address.ipv4(127, 0, 0, 1), UInt16(8000)),
                                         (Self.requestIPv6, .ipv6([UInt8](repeating: 0, count: 15) + [1]), 80)] {
            var h = Socks5ServerHandshake()
            let (events, _) = collect(&h, [5, 1, 0] + request, chunk: chunk) { h, e in
                if case .greeting = e { h.select(.noAuthentication) }
            }
            #expect(events == [.greeting(methods: [0]), .request(Socks5.Request(command: .connect, address: address, port: port))])
        }
    }

    @Test("every failure has its reply code")
    func failures() {
        func run(_ bytes: [UInt8], auth: Bool = false) -> Socks5.Failure? {
            var h = Socks5ServerHandshake()
            let (events, _) = collect(&h, bytes, chunk: 1) { h, e in
                switch e {
                case .greeting: h.select(auth ? .usernamePassword : .noAuthentication)
                case .credentials: h.authenticated()
                default: break
                }
            }
            if case .failure(let f) = events.last { return f }
            return nil
        }
        // SOCKS4 or noise instead of a greeting: "no acceptable methods".
        #expect(run([4, 1, 0, 80, 127, 0, 0, 1, 0]) == .unsupportedVersion(4))
        #expect(Socks5.Failure.unsupportedVersion(4).reply == [5, 0xFF])
        #expect(run(Array("GET / HTTP/1.1\r\n".utf8)) == .unsupportedVersion(UInt8(ascii: "G")))
        // RFC 1929 with a wrong version or an empty user name.
        #expect(run([5, 1, 2, 9, 1, 97, 1, 98], auth: true) == .malformedCredentials)
        #expect(run([5, 1, 2, 1, 0, 1, 98], auth: true) == .malformedCredentials)
        #expect(Socks5.Failure.malformedCredentials.reply == [1, 1])
        // BIND and unknown commands: command not supported (0x07); UDP ASSOCIATE is a request.
        #expect(run([5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]) == .commandNotSupported(2))
        #expect(run([5, 1, 0, 5, 3, 0, 1, 1, 2, 3, 4, 0, 80]) == nil)
        #expect(run([5, 1, 0, 5, 9, 0, 1, 1, 2, 3, 4, 0, 80]) == .commandNotSupported(9))
        #expect(Socks5.Failure.commandNotSupported(2).reply == [5, 7, 0, 1, 0, 0, 0, 0, 0, 0])
        // Unknown address type (0x08).
        #expect(run([5, 1, 0, 5, 1, 0, 7, 1, 2]) == .addressTypeNotSupported(7))
        #expect(Socks5.Failure.addressTypeNotSupported(7).reply == [5, 8, 0, 1, 0, 0, 0, 0, 0, 0])
        // Bad request version, non-zero reserved byte, empty or unprintable domain: general failure.
        #expect(run([5, 1, 0, 4, 1, 0, 1]) == .malformedRequest)
        #expect(run([5, 1, 0, 5, 1, 1, 1]) == .malformedRequest)
        #expect(run([5, 1, 0, 5, 1, 0, 3, 0]) == .malformedRequest)
        #expect(run([5, 1, 0, 5, 1, 0, 3, 3, 97, 10, 98, 0, 80]) == .malformedRequest)
        #expect(Socks5.Failure.malformedRequest.reply == [5, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    }

    @Test("a greeting without methods is complete (and gets 0xFF from the server)")
    func emptyGreeting() {
        var h = Socks5ServerHandshake()
        let (consumed, event) = [UInt8]([5, 0, 99]).withUnsafeBytes { h.feed($0) }
        #expect(consumed == 2)
        #expect(event == .greeting(methods: []))
    }

    @Test("the longest fields the format allows parse; truncated input waits")
    func longestFields() {
        var h = Socks5ServerHandshake()
        let name = [UInt8](repeating: UInt8(ascii: "a"), count: 255)
        let bytes: [UInt8] = [5, 1, 2, 1, 255] + name + [255] + name + [5, 1, 0, 3, 255] + name + [0, 1]
        let (events, consumed) = collect(&h, bytes, chunk: 13, answer: Self.selectPassword)
        #expect(events.count == 3)
        #expect(consumed == bytes.count)
        var t = Socks5ServerHandshake()
        let (c, e) = Array(bytes.prefix(100)).withUnsafeBytes { t.feed($0) }
        #expect(c == 3 && e == .greeting(methods: [2]))
        t.select(.usernamePassword)
        let (c2, e2) = Array(bytes[3..<100]).withUnsafeBytes { t.feed($0) }
        #expect(c2 == 97 && e2 == .needMore)
    }

    @Test("replies encode every code and bound address form")
    func replies() {
        for code in Socks5.Reply.allCases {
            #expect(Socks5.reply(code) == [5, code.rawValue, 0, 1, 0, 0, 0, 0, 0, 0])
        }
        #expect(Socks5.reply(.succeeded, bound: .ipv4(10, 1, 2, 3), port: 0x1234) == [5, 0, 0, 1, 10, 1, 2, 3, 0x12, 0x34])
        #expect(Socks5.reply(.succeeded, bound: .ipv6([UInt8](repeating: 0xAB, count: 16)), port: 1)
            == [5, 0, 0, 4] + [UInt8](repeating: 0xAB, count: 16) + [0, 1])
        #expect(Socks5.reply(.succeeded, bound: .domain("ab"), port: 2) == [5, 0, 0, 3, 2, 97, 98, 0, 2])
        #expect(Socks5.methodSelection(.usernamePassword) == [5, 2])
        #expect(Socks5.authenticationStatus(succeeded: true) == [1, 0])
    }
}

@Suite("SOCKS5 UDP header codec")
struct Socks5UDPCodecTests {
    static func parse(_ bytes: [UInt8]) -> Result<Socks5UDP.Header, Socks5UDP.Drop> { bytes.withUnsafeBytes { Socks5UDP.parse($0) } }

    @Test("every address type parses back from its header; the data starts after it")
    func roundTrip() throws {
        let v6 = (0..<16).map { UInt8($0) }
        for (address, length) in [(Socks5.Address.ipv4(192, 0, 2, 1), 10), (.ipv6(v6), 22), (.domain("dns.example"), 18)] {
            let header = Socks5UDP.header(from: address, port: 53)
            #expect(header.count == length)
            let parsed = try Self.parse(header + [0xAB, 0xCD]).get()
            #expect(parsed == Socks5UDP.Header(address: address, port: 53, length: length))
        }
        // Written in place (the relay's path) as built: IPv4 from its mapped form, IPv6.
        var out = [UInt8](repeating: 0xEE, count: 22)
        let n4 = out.withUnsafeMutableBytes { Socks5UDP.writeHeader(high: 0, low: 0xFFFF_C000_0201, port: 53, into: $0) }
        #expect(Array(out[0..<n4]) == Socks5UDP.header(from: .ipv4(192, 0, 2, 1), port: 53))
        let n6 = out.withUnsafeMutableBytes { Socks5UDP.writeHeader(high: 0x0001_0203_0405_0607, low: 0x0809_0A0B_0C0D_0E0F, port: 53, into: $0) }
        #expect(Array(out[0..<n6]) == Socks5UDP.header(from: .ipv6(v6), port: 53))
    }

    @Test("short, reserved, fragmented and unknown-type headers are refused with their reason")
    func drops() {
        #expect(Self.parse([]) == .failure(.short))
        #expect(Self.parse([0, 0, 0]) == .failure(.short))
        #expect(Self.parse([0, 0, 0, 1, 127, 0, 0, 1, 0]) == .failure(.short))
        #expect(Self.parse([0, 0, 0, 4] + [UInt8](repeating: 0, count: 17)) == .failure(.short))
        #expect(Self.parse([0, 0, 0, 3, 5, 97, 98]) == .failure(.short))
        #expect(Self.parse([0, 0, 0, 3, 0, 0, 53]) == .failure(.short))
        #expect(Self.parse([0, 1, 0, 1, 127, 0, 0, 1, 0, 53]) == .failure(.reserved))
        #expect(Self.parse([0, 0, 1, 1, 127, 0, 0, 1, 0, 53]) == .failure(.fragmented))
        #expect(Self.parse([0, 0, 0, 2, 127, 0, 0, 1, 0, 53]) == .failure(.addressType))
        #expect(Self.parse([0, 0, 0, 3, 2, 10, 97, 0, 53]) == .failure(.addressType))
        // An empty payload is a datagram too.
        #expect((try? Self.parse([0, 0, 0, 1, 127, 0, 0, 1, 0, 53]).get())?.length == 10)
    }
}
