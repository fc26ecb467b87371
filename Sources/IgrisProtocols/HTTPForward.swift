/// Plain HTTP proxying (RFC 9112 §3.2.2): an absolute-form request (`GET http://host/path
/// HTTP/1.1`, as clients with `http_proxy` set send) becomes the origin-form request sent to
/// `host`, and the request's body framing tells the engine where the request ends.
public enum HTTPForward {
    /// What goes to the origin.
    public struct Request: Equatable, Sendable {
        /// Request line in origin form, the client's fields less the hop-by-hop ones (and
        /// `Host` replaced by the target's authority), then `Connection: close`, so the
        /// origin ends the exchange with its response.
        public var head: [UInt8]
        public var body: HTTPBodyFraming.Kind
    }

    /// Fields that concern one hop only, never forwarded (RFC 9110 §7.6.1), plus the
    /// client's `Host` (replaced by the target's authority).
    static let hopByHop: Set<String> = ["connection", "proxy-connection", "keep-alive", "proxy-authorization",
                                         "proxy-authenticate", "te", "upgrade", "host"]

    /// `head` if its target is absolute-form `http://…`; nil for any other target.
    /// Returns host, port and the request for the origin, or why it can't be forwarded.
    public static func request(from head: HTTPRequestHead) -> Result<(host: String, port: UInt16, request: Request), HTTPConnect.Failure>? {
        let target = Array(head.target.utf8)
        guard let schemeLength = Self.schemeLength(target) else { return nil }
        let scheme = String(decoding: target[..<schemeLength], as: UTF8.self).lowercased()
        guard scheme == "http" else {
            return .failure(.malformed(scheme == "https" ? "https:// is proxied with CONNECT" : "unsupported scheme '\(scheme)'"))
        }
        let rest = target[(schemeLength + 3)...]
        let authorityEnd = rest.firstIndex { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "?") || $0 == UInt8(ascii: "#") } ?? rest.endIndex
        let authority = String(decoding: rest[..<authorityEnd], as: UTF8.self)
        var path = String(decoding: rest[authorityEnd...], as: UTF8.self)
        if let fragment = path.firstIndex(of: "#") { path = String(path[..<fragment]) }
        if path.isEmpty || path.hasPrefix("?") { path = "/" + path }
        guard !authority.contains("@") else { return .failure(.malformed("user information in the target")) }
        let hasPort = authority.hasPrefix("[") ? authority.contains("]:") : authority.contains(":")
        guard let (host, port) = HTTPConnect.splitAuthority(hasPort ? authority : authority + ":80") else {
            return .failure(.malformed("bad host in the target"))
        }
        let body: HTTPBodyFraming.Kind
        switch bodyFraming(head) {
        case .success(let kind): body = kind
        case .failure(let failure): return .failure(failure)
        }
        var named = Set<String>()
        if let connection = head.field("Connection") {
            for option in connection.split(separator: ",") { named.insert(option.trimmingSpaces().lowercased()) }
        }
        var text = "\(head.method) \(path) \(head.version)\r\nHost: \(authority)\r\n"
        for (name, value) in head.fields {
            let lower = name.lowercased()
            if hopByHop.contains(lower) || named.contains(lower) { continue }
            text += "\(name): \(value)\r\n"
        }
        text += "Connection: close\r\n\r\n"
        return .success((host, port, Request(head: Array(text.utf8), body: body)))
    }

    /// The length of `scheme` in `scheme://…` (letters, digits, + - .), or nil.
    static func schemeLength(_ target: [UInt8]) -> Int? {
        var i = 0
        while i < target.count && i < 16 {
            let c = target[i]
            let isLetter = (c | 0x20) >= UInt8(ascii: "a") && (c | 0x20) <= UInt8(ascii: "z")
            if isLetter || (i > 0 && ((c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) || c == UInt8(ascii: "+") || c == UInt8(ascii: "-") || c == UInt8(ascii: "."))) {
                i += 1
                continue
            }
            break
        }
        guard i > 0, i + 3 <= target.count, target[i] == UInt8(ascii: ":"), target[i + 1] == UInt8(ascii: "/"), target[i + 2] == UInt8(ascii: "/") else { return nil }
        return i
    }

    /// Where the request body ends: `Transfer-Encoding: chunked`, `Content-Length`, or none.
    /// Both at once, another coding, or a bad length is refused (a request smuggled past the
    /// body would reach the origin as one of this client's own).
    static func bodyFraming(_ head: HTTPRequestHead) -> Result<HTTPBodyFraming.Kind, HTTPConnect.Failure> {
        let lengths = head.fields.filter { $0.name.lowercased() == "content-length" }.map(\.value)
        let codings = head.fields.filter { $0.name.lowercased() == "transfer-encoding" }.map(\.value)
        if !codings.isEmpty {
            guard lengths.isEmpty else { return .failure(.malformed("both Transfer-Encoding and Content-Length")) }
            let all = codings.flatMap { $0.split(separator: ",") }.map { $0.trimmingSpaces().lowercased() }
            guard all == ["chunked"] else { return .failure(.malformed("Transfer-Encoding other than chunked")) }
            return .success(.chunked)
        }
        guard let first = lengths.first else { return .success(.length(0)) }
        guard lengths.allSatisfy({ $0 == first }), !first.isEmpty, first.utf8.count <= 18,
              first.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }), let n = UInt64(first) else {
            return .failure(.malformed("bad Content-Length"))
        }
        return .success(.length(n))
    }
}

/// Follows a request body as it streams past (copy path, client → origin) to tell where it
/// ends: a count for `Content-Length`, the chunk framing for `chunked`. Whatever a client sends
/// after that is not this request's and is never forwarded.
public struct HTTPBodyFraming: Sendable {
    public enum Kind: Equatable, Sendable {
        case length(UInt64)
        case chunked
    }

    private enum State: Sendable {
        case counting(UInt64)
        case size(UInt64, digits: Int)
        case extensions
        case sizeLF(UInt64)
        case data(UInt64)
        case dataCR
        case dataLF
        case trailerStart
        case trailerLine
        case lastLF
        case done
    }

    private var state: State

    public init(_ kind: Kind) {
        switch kind {
        case .length(let n): state = n == 0 ? .done : .counting(n)
        case .chunked: state = .size(0, digits: 0)
        }
    }

    public var isComplete: Bool { if case .done = state { return true } else { return false } }

    /// How many of `bytes` (the next ones from the client) belong to the body. Malformed
    /// chunk framing ends the body where it went wrong.
    public mutating func consume(_ bytes: UnsafeRawBufferPointer) -> Int {
        var i = 0
        while i < bytes.count {
            switch state {
            case .done:
                return i
            case .counting(let left):
                let take = Int(min(left, UInt64(bytes.count - i)))
                i += take
                state = left == UInt64(take) ? .done : .counting(left - UInt64(take))
                continue
            case .data(let left):
                let take = Int(min(left, UInt64(bytes.count - i)))
                i += take
                state = left == UInt64(take) ? .dataCR : .data(left - UInt64(take))
                continue
            default:
                break
            }
            let b = bytes[i]
            i += 1
            switch state {
            case .size(let n, let digits):
                if let v = Self.hex(b), digits < 15 {
                    state = .size(n << 4 | UInt64(v), digits: digits + 1)
                } else if digits > 0 && (b == UInt8(ascii: ";") || b == UInt8(ascii: " ") || b == UInt8(ascii: "\t")) {
                    state = .extensions
                    pendingSize = n
                } else if digits > 0 && b == UInt8(ascii: "\r") {
                    state = .sizeLF(n)
                } else {
                    state = .done
                    return i - 1
                }
            case .extensions:
                if b == UInt8(ascii: "\r") { state = .sizeLF(pendingSize) }
            case .sizeLF(let n):
                guard b == UInt8(ascii: "\n") else { state = .done; return i - 1 }
                state = n == 0 ? .trailerStart : .data(n)
            case .dataCR:
                guard b == UInt8(ascii: "\r") else { state = .done; return i - 1 }
                state = .dataLF
            case .dataLF:
                guard b == UInt8(ascii: "\n") else { state = .done; return i - 1 }
                state = .size(0, digits: 0)
            case .trailerStart:
                state = b == UInt8(ascii: "\r") ? .lastLF : b == UInt8(ascii: "\n") ? .done : .trailerLine
            case .trailerLine:
                if b == UInt8(ascii: "\n") { state = .trailerStart }
            case .lastLF:
                state = .done
                if b != UInt8(ascii: "\n") { return i - 1 }
            case .counting, .data, .done:
                break
            }
        }
        return i
    }

    /// The size of a chunk whose extensions are being skipped.
    private var pendingSize: UInt64 = 0

    private static func hex(_ b: UInt8) -> UInt8? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return b - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return b - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return b - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
