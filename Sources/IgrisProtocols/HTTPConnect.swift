/// The HTTP proxy: CONNECT tunnels (RFC 9110 §9.3.6) and plain absolute-form requests
/// (`HTTPForward`): what a request head asks for, and the responses.
public enum HTTPConnect {
    public struct Request: Equatable, Sendable {
        /// Host name or IP literal (brackets removed from IPv6).
        public var host: String
        public var port: UInt16
        /// From `Proxy-Authorization: Basic …`, if present.
        public var credentials: (username: [UInt8], password: [UInt8])?
        /// A plain request to forward (nil: CONNECT, a tunnel).
        public var forward: HTTPForward.Request?

        public init(host: String, port: UInt16, credentials: (username: [UInt8], password: [UInt8])? = nil) {
            self.host = host
            self.port = port
            self.credentials = credentials
        }

        public static func == (a: Request, b: Request) -> Bool {
            a.host == b.host && a.port == b.port && a.forward == b.forward
                && a.credentials?.username == b.credentials?.username && a.credentials?.password == b.credentials?.password
        }
    }

    public enum Failure: Error, Equatable, Sendable {
        case malformed(String)
        case methodNotAllowed(String)
        case tooLarge

        public var status: Status {
            switch self {
            case .malformed, .tooLarge: return .badRequest
            case .methodNotAllowed: return .methodNotAllowed
            }
        }
    }

    public enum Status: Int, Sendable {
        case established = 200
        case badRequest = 400
        case forbidden = 403
        case methodNotAllowed = 405
        case proxyAuthenticationRequired = 407
        case tooManyRequests = 429
        case badGateway = 502
        case serviceUnavailable = 503
        case gatewayTimeout = 504

        public var reason: String {
            switch self {
            case .established: return "Connection established"
            case .badRequest: return "Bad Request"
            case .forbidden: return "Forbidden"
            case .methodNotAllowed: return "Method Not Allowed"
            case .proxyAuthenticationRequired: return "Proxy Authentication Required"
            case .tooManyRequests: return "Too Many Requests"
            case .badGateway: return "Bad Gateway"
            case .serviceUnavailable: return "Service Unavailable"
            case .gatewayTimeout: return "Gateway Timeout"
            }
        }
    }

    /// Interprets a parsed head: a CONNECT, or an absolute-form request to forward. Any other
    /// request is not for a proxy (405).
    public static func request(from head: HTTPRequestHead) -> Result<Request, Failure> {
        var request: Request
        if head.method == "CONNECT" {
            guard let (host, port) = splitAuthority(head.target) else {
                return .failure(.malformed("CONNECT target must be HOST:PORT"))
            }
            request = Request(host: host, port: port)
        } else {
            switch HTTPForward.request(from: head) {
            case nil: return .failure(.methodNotAllowed(head.method))
            case .failure(let failure): return .failure(failure)
            case .success(let target):
                request = Request(host: target.host, port: target.port)
                request.forward = target.request
            }
        }
        if let authorization = head.field("Proxy-Authorization") {
            guard let credentials = basicCredentials(authorization) else {
                return .failure(.malformed("Proxy-Authorization is not Basic credentials"))
            }
            request.credentials = credentials
        }
        return .success(request)
    }

    /// `host:port` or `[v6]:port`; the port is required and non-zero.
    static func splitAuthority(_ target: String) -> (String, UInt16)? {
        let host: Substring
        let portText: Substring
        if target.hasPrefix("[") {
            guard let close = target.firstIndex(of: "]") else { return nil }
            host = target[target.index(after: target.startIndex)..<close]
            let rest = target[target.index(after: close)...]
            guard rest.hasPrefix(":") else { return nil }
            portText = rest.dropFirst()
        } else {
            guard let colon = target.lastIndex(of: ":") else { return nil }
            host = target[..<colon]
            portText = target[target.index(after: colon)...]
            if host.contains(":") { return nil }
        }
        guard !host.isEmpty, host.utf8.count <= 255, host.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F && $0 != UInt8(ascii: "/") && $0 != UInt8(ascii: "@") }),
              !portText.isEmpty, portText.utf8.count <= 5, portText.allSatisfy({ $0.isASCII && $0.isNumber }),
              let port = UInt16(portText), port != 0 else { return nil }
        return (String(host), port)
    }

    /// `Basic base64(user:password)`.
    static func basicCredentials(_ value: String) -> (username: [UInt8], password: [UInt8])? {
        let parts = value.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "basic",
              let decoded = Base64.decode(parts[1].trimmingSpaces()),
              let colon = decoded.firstIndex(of: UInt8(ascii: ":")) else { return nil }
        return (Array(decoded[..<colon]), Array(decoded[(colon + 1)...]))
    }

    /// The whole response head. Errors close the connection, so they say so and carry no body.
    public static func response(_ status: Status) -> [UInt8] {
        var text = "HTTP/1.1 \(status.rawValue) \(status.reason)\r\n"
        if status != .established {
            if status == .proxyAuthenticationRequired { text += "Proxy-Authenticate: Basic realm=\"igris\"\r\n" }
            if status == .methodNotAllowed { text += "Allow: CONNECT\r\n" }
            text += "Content-Length: 0\r\nConnection: close\r\n"
        }
        text += "\r\n"
        return Array(text.utf8)
    }
}

extension Substring {
    func trimmingSpaces() -> Substring {
        var s = self
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return s
    }
}
