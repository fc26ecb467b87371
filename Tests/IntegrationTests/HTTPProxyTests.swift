import Foundation
import Glibc
import IgrisEngine
import IgrisPolicy
import Testing

/// A test origin for plain HTTP proxying: reads one request (head, then a Content-Length or
/// chunked body), records it, and answers with the body's length and SHA-256, then closes.
final class RecordingOrigin: @unchecked Sendable {
    struct Request {
        var head: String
        var body: [UInt8]
    }

    let upstream: TestUpstream
    let requests = SharedBox<[Request]>([])
    var port: UInt16 { upstream.address.port }

    init() throws {
        let requests = requests
        upstream = try TestUpstream { socket in
            socket.setReceiveTimeout(seconds: 10)
            guard let request = Self.readRequest(socket) else { socket.close(); return }
            requests.update { $0.append(request) }
            let digest = sha256(request.body).map { String(format: "%02x", $0) }.joined()
            let text = "length=\(request.body.count) sha256=\(digest)"
            socket.write(Array("HTTP/1.1 200 OK\r\nContent-Length: \(text.utf8.count)\r\nConnection: close\r\n\r\n\(text)".utf8))
            socket.close()
        }
    }

    func stop() { upstream.stop() }

    static func readRequest(_ s: TestSocket) -> Request? {
        var head: [UInt8] = []
        while !head.ends(with: [13, 10, 13, 10]) {
            guard s.readOneByte(into: &head) else { return nil }
        }
        let text = String(decoding: head, as: UTF8.self)
        let lines = text.lowercased().split(separator: "\r\n")
        var body: [UInt8] = []
        if lines.contains("transfer-encoding: chunked") {
            while true {
                var line: [UInt8] = []
                while !line.ends(with: [13, 10]) { guard s.readOneByte(into: &line) else { return nil } }
                let sizeText = String(decoding: line.dropLast(2), as: UTF8.self).split(separator: ";").first ?? ""
                guard let size = Int(sizeText, radix: 16) else { return nil }
                if size == 0 {
                    var trailer: [UInt8] = []
                    while !trailer.ends(with: [13, 10]) || (trailer.count > 2 && !trailer.ends(with: [13, 10, 13, 10])) {
                        guard s.readOneByte(into: &trailer) else { return nil }
                        if trailer == [13, 10] { break }
                    }
                    break
                }
                guard let data = try? s.readExactly(size + 2) else { return nil }
                body += data.prefix(size)
            }
        } else if let length = lines.first(where: { $0.hasPrefix("content-length:") }).flatMap({ Int($0.dropFirst(15).trimmingCharacters(in: .whitespaces)) }) {
            guard let data = try? s.readExactly(length) else { return nil }
            body = data
        }
        return Request(head: text, body: body)
    }
}

extension TestSocket {
    /// Appends one byte read; false at EOF or error.
    func readOneByte(into bytes: inout [UInt8]) -> Bool {
        var b: UInt8 = 0
        guard Syscall.recv(fd, &b, 1) == 1 else { return false }
        bytes.append(b)
        return true
    }
}

extension Array where Element == UInt8 {
    func ends(with suffix: [UInt8]) -> Bool { count >= suffix.count && Array(self[(count - suffix.count)...]) == suffix }
}

/// Plain HTTP through the HTTP proxy listener: what clients with `http_proxy` set do.
@Suite("HTTP forward proxy", .serialized)
struct HTTPProxyTests {
    @Test("curl -x, wget and python requests with http_proxy fetch a file intact through the HTTP listener", arguments: engineBackends)
    func realClients(backend: BackendChoice) throws {
        let files = try FileServer()
        defer { files.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(files.port)"])
        defer { gateway.stop() }
        let url = "http://localhost:\(files.port)/blob"
        let viaCurl = try curl(["-x", "http://\(gateway.http)", url])
        #expect(viaCurl.status == 0 && viaCurl.digest == files.digest, "\(viaCurl.stderr)")

        let out = NSTemporaryDirectory() + "igris-wget-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(out) }
        let (wgetStatus, _, wgetErr) = try runShell("http_proxy=http://\(gateway.http) /usr/bin/wget -q -T 20 -t 1 -O \(out) \(url)")
        #expect(wgetStatus == 0, "\(wgetErr)")
        #expect(FileManager.default.contents(atPath: out).map { sha256(Array($0)) } == files.digest)

        let script = """
            import hashlib, os, requests
            r = requests.get('\(url)', timeout=20)
            r.raise_for_status()
            print(hashlib.sha256(r.content).hexdigest())
            """
        let (pyStatus, pyOut, pyErr) = try runShell("http_proxy=http://\(gateway.http) /usr/bin/python3 -c \"\(script)\"")
        #expect(pyStatus == 0, "\(pyErr)")
        #expect(pyOut.trimmingCharacters(in: .whitespacesAndNewlines) == files.digest.map { String(format: "%02x", $0) }.joined())
        #expect(gateway.total(.handshakesCompleted) == 3)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("POST bodies arrive intact (Content-Length and chunked); the origin gets origin form, its own Host, no proxy fields",
          arguments: engineBackends)
    func bodiesAndHeaders(backend: BackendChoice) throws {
        let origin = try RecordingOrigin()
        defer { origin.stop() }
        let users = UserDirectory(accounts: [UserAccount(name: "alice", passwordHash: try PasswordHasher.hash(Array("pw".utf8)))])
        let gateway = try ProxyGateway(backend: backend, auth: true, allow: ["127.0.0.1/32:\(origin.port)"], users: users)
        defer { gateway.stop() }
        var payload = [UInt8](repeating: 0, count: 700_000)
        var pattern = PatternStream(seed: 77)
        payload.withUnsafeMutableBytes { pattern.fill($0) }
        let file = NSTemporaryDirectory() + "igris-post-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try Data(payload).write(to: URL(fileURLWithPath: file))
        defer { unlink(file) }
        let expected = "length=\(payload.count) sha256=\(sha256(payload).map { String(format: "%02x", $0) }.joined())"
        let url = "http://127.0.0.1:\(origin.port)/upload?x=1"

        // No credentials: 407 with a Basic challenge.
        let (denied, deniedOut, _) = try runShell("/usr/bin/curl -sS -o /dev/null -w '%{http_code}' -x http://\(gateway.http) \(url)")
        #expect(denied == 0 && deniedOut == "407")
        for extra in [[String](), ["-H", "Transfer-Encoding: chunked"]] {
            let out = NSTemporaryDirectory() + "igris-post-out-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            defer { unlink(out) }
            let (status, stderr) = try runCommand("/usr/bin/curl", ["-sS", "--max-time", "20", "-o", out, "-x", "http://\(gateway.http)",
                                                                   "-U", "alice:pw", "--data-binary", "@\(file)"] + extra + [url], timeout: 30)
            #expect(status == 0, "\(stderr)")
            #expect(String(decoding: FileManager.default.contents(atPath: out) ?? Data(), as: UTF8.self) == expected, "\(extra)")
        }
        let heads = origin.requests.value.map(\.head)
        #expect(heads.count == 2)
        for head in heads {
            #expect(head.hasPrefix("POST /upload?x=1 HTTP/1.1\r\nHost: 127.0.0.1:\(origin.port)\r\n"), "\(head)")
            #expect(!head.lowercased().contains("proxy-"), "\(head)")
            #expect(head.hasSuffix("Connection: close\r\n\r\n"), "\(head)")
        }
        #expect(heads[1].contains("Transfer-Encoding: chunked"))
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }

    @Test("ACL: a denied destination gets 403; a pipelined request for another host never reaches the first origin",
          arguments: engineBackends)
    func deniedAndPipelined(backend: BackendChoice) throws {
        let first = try RecordingOrigin()
        defer { first.stop() }
        let second = try RecordingOrigin()
        defer { second.stop() }
        let gateway = try ProxyGateway(backend: backend, allow: ["127.0.0.1/32:\(first.port)", "127.0.0.1/32:\(second.port)"])
        defer { gateway.stop() }

        let denied = try TestSocket.connect(gateway.http)
        denied.setReceiveTimeout(seconds: 10)
        denied.write(Array("GET http://127.0.0.1:\(try unusedPort())/ HTTP/1.1\r\nHost: x\r\n\r\n".utf8))
        #expect(try readHTTPResponse(denied).hasPrefix("HTTP/1.1 403 "))
        denied.close()

        // Two requests in one write: the first to `first`, with a body; the second to `second`.
        let secondRequest = "GET http://127.0.0.1:\(second.port)/two HTTP/1.1\r\nHost: b\r\n\r\n"
        let s = try TestSocket.connect(gateway.http)
        s.setReceiveTimeout(seconds: 10)
        s.write(Array("POST http://127.0.0.1:\(first.port)/one HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nbody\(secondRequest)".utf8))
        let response = try readHTTPResponse(s)
        #expect(response.hasPrefix("HTTP/1.1 200 "), "\(response)")
        #expect(gateway.eventually { gateway.total(.bytesAfterRequestDropped) == Int64(secondRequest.utf8.count) })
        var rest = [UInt8](repeating: 0, count: 256)
        var body = 0
        while true {
            let n = rest.withUnsafeMutableBytes { s.read(into: $0) }
            if n <= 0 {
                #expect(n == 0, "the connection ends with the response (EOF, not \(n))")
                break
            }
            body += n
        }
        #expect(body > 0 && response.contains("Content-Length: \(body)\r\n"), "\(response) + \(body) bytes")
        s.close()
        #expect(first.requests.value.count == 1 && first.requests.value.first?.body == Array("body".utf8))
        #expect(second.requests.value.isEmpty && second.upstream.accepted.value == 0)
        #expect(gateway.eventually { gateway.total(.activeConnections) == 0 })
    }
}
