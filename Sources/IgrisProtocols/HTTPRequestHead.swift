/// An HTTP/1.x request head: request line and header fields, as parsed by `HTTPHeadParser`.
public struct HTTPRequestHead: Equatable, Sendable {
    public var method: String
    public var target: String
    /// "HTTP/1.1" or "HTTP/1.0".
    public var version: String
    /// In order received; names as sent (compare case-insensitively with `field(_:)`).
    public var fields: [(name: String, value: String)]

    public init(method: String, target: String, version: String, fields: [(name: String, value: String)]) {
        self.method = method
        self.target = target
        self.version = version
        self.fields = fields
    }

    /// The first field named `name`, case-insensitively.
    public func field(_ name: String) -> String? {
        let wanted = name.lowercased()
        return fields.first { $0.name.lowercased() == wanted }?.value
    }

    public static func == (a: HTTPRequestHead, b: HTTPRequestHead) -> Bool {
        a.method == b.method && a.target == b.target && a.version == b.version
            && a.fields.count == b.fields.count
            && zip(a.fields, b.fields).allSatisfy { $0.name == $1.name && $0.value == $1.value }
    }
}

public enum HTTPHeadError: Error, Equatable, Sendable {
    /// No end of head within the size limit.
    case tooLarge(limit: Int)
    /// Not a request line, a field without a colon, an obsolete line folding, a bare CR, …
    case malformed(String)
}

/// An incremental HTTP/1.x request-head parser: fed bytes as they arrive, it reports the head
/// once the empty line ending it is in, taking no byte past it (what follows belongs to the
/// tunnel). A head longer than `limit` bytes is an error, never a growing buffer.
public struct HTTPHeadParser: Sendable {
    public enum Event: Equatable, Sendable {
        case needMore
        case head(HTTPRequestHead)
        case failure(HTTPHeadError)
    }

    public let limit: Int
    private var pending: [UInt8] = []
    private var done = false

    public init(limit: Int = 8192) {
        self.limit = limit
    }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer) -> (consumed: Int, event: Event) {
        guard !done else { return (0, .failure(.malformed("data after the head"))) }
        var i = 0
        while i < bytes.count {
            let b = bytes[i]
            pending.append(b)
            i += 1
            if b == UInt8(ascii: "\n") && endsHead() {
                done = true
                let head = pending
                pending = []
                switch Self.parse(head) {
                case .success(let h): return (i, .head(h))
                case .failure(let e): return (i, .failure(e))
                }
            }
            if pending.count >= limit {
                done = true
                return (i, .failure(.tooLarge(limit: limit)))
            }
        }
        return (i, .needMore)
    }

    /// The head ends at an empty line: CRLF CRLF, or LF LF from lenient clients.
    private func endsHead() -> Bool {
        let n = pending.count
        if n >= 4 && pending[n - 4] == 13 && pending[n - 3] == 10 && pending[n - 2] == 13 { return true }
        if n >= 2 && pending[n - 2] == 10 { return true }
        return false
    }

    static func parse(_ bytes: [UInt8]) -> Result<HTTPRequestHead, HTTPHeadError> {
        var lines: [ArraySlice<UInt8>] = []
        var start = 0
        for (i, b) in bytes.enumerated() where b == 10 {
            var end = i
            if end > start && bytes[end - 1] == 13 { end -= 1 }
            lines.append(bytes[start..<end])
            start = i + 1
        }
        // The last line is the empty one that ended the head.
        guard lines.count >= 2, lines.last!.isEmpty else { return .failure(.malformed("no request line")) }
        lines.removeLast()
        for line in lines where line.contains(13) || line.contains(0) {
            return .failure(.malformed("control character in head"))
        }
        let requestLine = lines[0].split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false)
        guard requestLine.count == 3, !requestLine[0].isEmpty, !requestLine[1].isEmpty else {
            return .failure(.malformed("request line is not METHOD TARGET VERSION"))
        }
        let method = String(decoding: requestLine[0], as: UTF8.self)
        guard method.utf8.allSatisfy(isTokenCharacter) else { return .failure(.malformed("bad method")) }
        let version = String(decoding: requestLine[2], as: UTF8.self)
        guard version == "HTTP/1.1" || version == "HTTP/1.0" else {
            return .failure(.malformed("unsupported version"))
        }
        let target = String(decoding: requestLine[1], as: UTF8.self)
        var fields: [(name: String, value: String)] = []
        for line in lines.dropFirst() {
            guard let first = line.first, first != UInt8(ascii: " "), first != UInt8(ascii: "\t") else {
                return .failure(.malformed("obsolete line folding"))
            }
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > line.startIndex else {
                return .failure(.malformed("header field without a name"))
            }
            let name = line[line.startIndex..<colon]
            guard name.allSatisfy(isTokenCharacter) else { return .failure(.malformed("bad header field name")) }
            var value = line[(colon + 1)...]
            while let f = value.first, f == 32 || f == 9 { value = value.dropFirst() }
            while let l = value.last, l == 32 || l == 9 { value = value.dropLast() }
            fields.append((String(decoding: name, as: UTF8.self), String(decoding: value, as: UTF8.self)))
        }
        return .success(HTTPRequestHead(method: method, target: target, version: version, fields: fields))
    }

    /// RFC 9110 tchar.
    static func isTokenCharacter(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return "!#$%&'*+-.^_`|~".utf8.contains(c)
        }
    }
}
