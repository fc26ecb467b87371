/// Durations as operators write them: `500ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
public enum DurationText {
    /// Nanoseconds, or nil for anything else (negative, not a number, absurdly long).
    public static func parse(_ text: String) -> UInt64? {
        let units: [(String, Double)] = [("ms", 1e6), ("us", 1e3), ("µs", 1e3), ("s", 1e9), ("m", 60e9), ("h", 3600e9)]
        var number = Substring(text)
        var scale = 1e9
        for (suffix, factor) in units where text.hasSuffix(suffix) {
            number = text.dropLast(suffix.count)
            scale = factor
            break
        }
        guard let value = Double(number), value >= 0, value.isFinite, value * scale < 1e18 else { return nil }
        return UInt64(value * scale)
    }
}
