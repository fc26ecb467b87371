import Yams

/// Codable helpers for operator-written YAML: unknown keys are errors (a typo must not
/// silently fall back to a default), and every error names its key path and line.
public struct AnyCodingKey: CodingKey, Hashable {
    public var stringValue: String
    public var intValue: Int?
    public init(stringValue: String) { self.stringValue = stringValue }
    public init(intValue: Int) {
        stringValue = "\(intValue)"
        self.intValue = intValue
    }
}

extension Decoder {
    /// Throws for the first key of this mapping that is not in `known`.
    public func rejectUnknownKeys(_ known: Set<String>) throws {
        let container = try container(keyedBy: AnyCodingKey.self)
        for key in container.allKeys where !known.contains(key.stringValue) {
            throw DecodingError.dataCorrupted(.init(
                codingPath: codingPath + [key],
                debugDescription: "unknown key '\(key.stringValue)' (expected one of: \(known.sorted().joined(separator: ", ")))"))
        }
    }
}

/// A configuration error with where it is: `users[2].expires (line 14): …`.
public struct YAMLFileError: Error, CustomStringConvertible, Sendable {
    public var file: String
    public var keyPath: String
    public var line: Int?
    public var message: String

    public init(file: String, keyPath: String, line: Int?, message: String) {
        self.file = file
        self.keyPath = keyPath
        self.line = line
        self.message = message
    }

    public var description: String {
        var location = file
        if let line { location += ":\(line)" }
        if !keyPath.isEmpty { location += ": \(keyPath)" }
        return "\(location): \(message)"
    }
}

public enum StrictYAML {
    /// Decodes `text` as `T`, turning Yams and decoding errors into a `YAMLFileError`.
    public static func decode<T: Decodable>(_ type: T.Type, from text: String, file: String) throws(YAMLFileError) -> T {
        do {
            return try YAMLDecoder().decode(T.self, from: text)
        } catch let DecodingError.dataCorrupted(context) where context.underlyingError is YamlError {
            throw YAMLFileError(file: file, keyPath: "", line: nil, message: "not valid YAML: \(context.underlyingError!)")
        } catch let error as DecodingError {
            let (path, message) = describe(error)
            let node = try? Yams.compose(yaml: text)
            return try { () throws(YAMLFileError) -> T in
                throw YAMLFileError(file: file, keyPath: keyPath(path), line: node.flatMap { line(of: path, in: $0) }, message: message)
            }()
        } catch let error as YamlError {
            throw YAMLFileError(file: file, keyPath: "", line: nil, message: "not valid YAML: \(error)")
        } catch {
            throw YAMLFileError(file: file, keyPath: "", line: nil, message: "\(error)")
        }
    }

    static func describe(_ error: DecodingError) -> ([CodingKey], String) {
        switch error {
        case .typeMismatch(let type, let c): return (c.codingPath, "expected \(typeName(type)); \(c.debugDescription)")
        case .valueNotFound(let type, let c): return (c.codingPath, "missing value (expected \(typeName(type)))")
        case .keyNotFound(let key, let c): return (c.codingPath + [key], "required key '\(key.stringValue)' is missing")
        case .dataCorrupted(let c): return (c.codingPath, c.debugDescription)
        @unknown default: return ([], "\(error)")
        }
    }

    static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: return "a string"
        case is Int.Type, is UInt64.Type, is Int64.Type, is UInt16.Type: return "an integer"
        case is Bool.Type: return "true or false"
        default: return "\(type)"
        }
    }

    public static func keyPath(_ path: [CodingKey]) -> String {
        var out = ""
        for key in path {
            if let i = key.intValue { out += "[\(i)]" } else { out += out.isEmpty ? key.stringValue : ".\(key.stringValue)" }
        }
        return out
    }

    /// The line of the deepest node along `path` (1-based).
    static func line(of path: [CodingKey], in root: Node) -> Int? {
        var node = root
        var line = root.mark?.line
        for key in path {
            if let i = key.intValue, let seq = node.sequence, i < seq.count {
                node = seq[i]
            } else if let mapping = node.mapping,
                      let pair = mapping.first(where: { $0.key.string == key.stringValue }) {
                line = pair.key.mark?.line ?? line
                node = pair.value
                continue
            } else {
                break
            }
            line = node.mark?.line ?? line
        }
        return line
    }
}
