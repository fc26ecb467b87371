import ArgumentParser

/// `500ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
struct DurationArgument: ExpressibleByArgument, CustomStringConvertible {
    let nanoseconds: UInt64
    let text: String

    init?(argument: String) {
        let units: [(String, Double)] = [("ms", 1e6), ("s", 1e9), ("m", 60e9), ("h", 3600e9)]
        var number = Substring(argument)
        var scale = 1e9
        for (suffix, factor) in units where argument.hasSuffix(suffix) {
            number = argument.dropLast(suffix.count)
            scale = factor
            break
        }
        guard let value = Double(number), value >= 0, value.isFinite, value * scale < 1e18 else { return nil }
        nanoseconds = UInt64(value * scale)
        text = argument
    }

    var description: String { text }
    static var defaultCompletionKind: CompletionKind { .default }
}
