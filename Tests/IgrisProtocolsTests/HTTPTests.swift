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
        #expect(status("GET http://example.org/ HTTP/1.1\r\n\r\n") == .methodNotAllowed)
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
