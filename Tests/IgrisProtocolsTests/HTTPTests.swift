import Testing
@testable import IgrisProtocols

func parseHead(_ text: String, chunk: Int, limit: Int = 8192) -> (HTTPHeadParser.Event, consumed: Int) {
    var parser = HTTPHeadParser(limit: limit)
    let bytes = Array(text.utf8)
    var offset = 0
    while offset < bytes.count {
        let end = min(bytes.count, offset + chunk)
        let (consumed, event) = bytes[offset..<end].withUnsafeBytes { parser.feed($0) }
        offset += consumed
        if event != .needMore { return (event, offset) }
    }
    return (.needMore, offset)
}

@Suite("HTTP CONNECT codec")
struct HTTPConnectCodecTests {
    @Test("CONNECT with Basic credentials, split at every byte; the tunnel's bytes are left", arguments: [1, 5, 10_000])
    func connect(chunk: Int) throws {
        let head = "CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\nProxy-Authorization: Basic \(Base64.encode(Array("alice:s3cr:et".utf8)))\r\n\r\n"
        let (event, consumed) = parseHead(head + "\u{16}\u{03}\u{01}", chunk: chunk)
        #expect(consumed == head.utf8.count)
        guard case .head(let parsed) = event else { Issue.record("no head: \(event)"); return }
        #expect(parsed.method == "CONNECT" && parsed.version == "HTTP/1.1")
        #expect(parsed.field("host") == "example.org:443")
        let request = try HTTPConnect.request(from: parsed).get()
        #expect(request == HTTPConnect.Request(host: "example.org", port: 443,
                                               credentials: (Array("alice".utf8), Array("s3cr:et".utf8))))
    }

    @Test("IPv6 targets, HTTP/1.0, LF-only line ends")
    func variants() throws {
        guard case .head(let h) = parseHead("CONNECT [::1]:8080 HTTP/1.0\n\n", chunk: 3).0 else { Issue.record(); return }
        #expect(try HTTPConnect.request(from: h).get() == HTTPConnect.Request(host: "::1", port: 8080))
    }

    @Test("status for every failure: 405 for other methods, 400 for malformed or oversize heads")
    func failures() {
        func status(_ text: String, limit: Int = 8192) -> HTTPConnect.Status? {
            switch parseHead(text, chunk: 1, limit: limit).0 {
            case .failure: return .badRequest
            case .head(let h):
                switch HTTPConnect.request(from: h) {
                case .success: return nil
                case .failure(let f): return f.status
                }
            case .needMore: return nil
            }
        }
        #expect(status("GET /index.html HTTP/1.1\r\n\r\n") == .methodNotAllowed)
        #expect(status("GET http://example.org/ HTTP/1.1\r\n\r\n") == nil, "absolute-form: forwarded")
        #expect(status("GET https://example.org/ HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("GET ftp://example.org/ HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("GET http://u@example.org/ HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("GET http:///x HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n") == .badRequest)
        #expect(status("POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n") == .badRequest)
        #expect(status("POST http://a/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n") == .badRequest)
        #expect(status("POST http://a/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n") == .badRequest)
        #expect(status("CONNECT example.org HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("CONNECT example.org:0 HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("CONNECT example.org:99999 HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("CONNECT user@example.org:80 HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("CONNECT a:1 HTTP/2.0\r\n\r\n") == .badRequest)
        #expect(status("CONNECT a:1  HTTP/1.1\r\n\r\n") == .badRequest)
        #expect(status("CONNECT a:1 HTTP/1.1\r\nBad Header\r\n\r\n") == .badRequest)
        #expect(status("CONNECT a:1 HTTP/1.1\r\nX: y\r\n folded\r\n\r\n") == .badRequest)
        #expect(status("CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Bearer abc\r\n\r\n") == .badRequest)
        #expect(status("CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: Basic !!!!\r\n\r\n") == .badRequest)
        #expect(status("\r\n\r\n") == .badRequest)
        #expect(status("CONNECT a:1 HTTP/1.1\r\nX: " + String(repeating: "x", count: 200) + "\r\n\r\n", limit: 128) == .badRequest)
        #expect(status("CONNECT a:1 HTTP/1.1\r\n\r\n") == nil)
    }

    @Test("an oversize head stops at the limit, never buffering more")
    func oversize() {
        let (event, consumed) = parseHead("CONNECT a:1 HTTP/1.1\r\n" + String(repeating: "X-Pad: 1\r\n", count: 2000), chunk: 4096)
        #expect(event == .failure(.tooLarge(limit: 8192)))
        #expect(consumed == 8192)
    }

    @Test("responses")
    func responses() {
        #expect(String(decoding: HTTPConnect.response(.established), as: UTF8.self) == "HTTP/1.1 200 Connection established\r\n\r\n")
        let auth = String(decoding: HTTPConnect.response(.proxyAuthenticationRequired), as: UTF8.self)
        #expect(auth.hasPrefix("HTTP/1.1 407 ") && auth.contains("Proxy-Authenticate: Basic realm=\"igris\"\r\n"))
        #expect(String(decoding: HTTPConnect.response(.methodNotAllowed), as: UTF8.self).contains("Allow: CONNECT\r\n"))
        for status in [HTTPConnect.Status.badRequest, .forbidden, .tooManyRequests, .badGateway, .gatewayTimeout] {
            let text = String(decoding: HTTPConnect.response(status), as: UTF8.self)
            #expect(text.hasPrefix("HTTP/1.1 \(status.rawValue) ") && text.hasSuffix("Connection: close\r\n\r\n"))
        }
    }

    @Test("base64 round trips and rejects non-canonical input")
    func base64() {
        for n in 0..<20 {
            let bytes = (0..<n).map { UInt8(($0 * 37 + 11) & 0xFF) }
            #expect(Base64.decode(Base64.encode(bytes)) == bytes)
        }
        #expect(Base64.encode(Array("alice:secret".utf8)) == "YWxpY2U6c2VjcmV0")
        #expect(Base64.decode("YWxpY2U6c2VjcmV0") == Array("alice:secret".utf8))
        #expect(Base64.decode("YWJ") == nil)
        #expect(Base64.decode("Y=Jj") == nil)
        #expect(Base64.decode("YW=j") == nil)
        #expect(Base64.decode("YW*j") == nil)
    }
}

@Suite("HTTP forward proxy codec")
struct HTTPForwardCodecTests {
    static func forward(_ text: String) throws -> HTTPConnect.Request {
        guard case .head(let head) = parseHead(text, chunk: 7).0 else { throw CodecFailure("no head") }
        return try HTTPConnect.request(from: head).get()
    }

    struct CodecFailure: Error { let text: String; init(_ t: String) { text = t } }

    @Test("absolute-form becomes origin-form: Host from the target, hop-by-hop fields gone, Connection: close")
    func rewrite() throws {
        let r = try Self.forward("GET http://Example.org:8080/a/b?q=1#frag HTTP/1.1\r\nHost: wrong\r\nUser-Agent: t\r\n"
            + "Proxy-Authorization: Basic \(Base64.encode(Array("alice:pw".utf8)))\r\nProxy-Connection: keep-alive\r\n"
            + "Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nAccept: */*\r\n\r\n")
        #expect(r.host == "Example.org" && r.port == 8080)
        #expect(r.credentials?.username == Array("alice".utf8) && r.credentials?.password == Array("pw".utf8))
        let forward = try #require(r.forward)
        #expect(String(decoding: forward.head, as: UTF8.self)
                == "GET /a/b?q=1 HTTP/1.1\r\nHost: Example.org:8080\r\nUser-Agent: t\r\nAccept: */*\r\nConnection: close\r\n\r\n")
        #expect(forward.body == .length(0))

        let v6 = try Self.forward("HEAD http://[::1]/ HTTP/1.0\r\n\r\n")
        #expect(v6.host == "::1" && v6.port == 80)
        #expect(String(decoding: v6.forward!.head, as: UTF8.self) == "HEAD / HTTP/1.0\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
        #expect(try Self.forward("GET http://a?x HTTP/1.1\r\n\r\n").forward!.head.starts(with: Array("GET /?x HTTP/1.1".utf8)))
        #expect(try Self.forward("POST http://a/ HTTP/1.1\r\ncontent-length: 12\r\n\r\n").forward!.body == .length(12))
        #expect(try Self.forward("POST http://a/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n").forward!.body == .chunked)
        let chunkedHead = String(decoding: try Self.forward("POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").forward!.head, as: UTF8.self)
        #expect(chunkedHead.contains("Transfer-Encoding: chunked\r\n"), "the body is forwarded as framed")
    }

    /// Feeds `bytes` in pieces of `chunk`; returns how many belonged to the body.
    static func bodyLength(_ kind: HTTPBodyFraming.Kind, _ bytes: [UInt8], chunk: Int) -> Int {
        var framing = HTTPBodyFraming(kind)
        var total = 0
        var offset = 0
        while offset < bytes.count {
            let end = min(bytes.count, offset + chunk)
            let n = bytes[offset..<end].withUnsafeBytes { framing.consume($0) }
            total += n
            if n < end - offset { break }
            offset = end
        }
        return total
    }

    @Test("where a body ends: Content-Length, and chunked (extensions, trailers) split at every byte; what follows is not the body",
          arguments: [1, 2, 3, 7, 64, 100_000])
    func bodyEnd(chunk: Int) {
        let next = Array("GET http://other/ HTTP/1.1\r\n\r\n".utf8)
        #expect(Self.bodyLength(.length(5), Array("hello".utf8) + next, chunk: chunk) == 5)
        #expect(Self.bodyLength(.length(0), next, chunk: chunk) == 0)
        let chunked = Array("5\r\nhello\r\n1A;name=value\r\n\(String(repeating: "x", count: 26))\r\n0\r\nX-Trailer: 1\r\n\r\n".utf8)
        #expect(Self.bodyLength(.chunked, chunked + next, chunk: chunk) == chunked.count)
        let bare = Array("3\r\nabc\r\n0\r\n\r\n".utf8)
        #expect(Self.bodyLength(.chunked, bare + next, chunk: chunk) == bare.count)
        // Broken framing ends the body where it breaks: nothing after it is forwarded.
        #expect(Self.bodyLength(.chunked, Array("zz\r\n".utf8) + next, chunk: chunk) == 0)
        #expect(Self.bodyLength(.chunked, Array("3\r\nabcX".utf8) + next, chunk: chunk) == 6)
    }
}
