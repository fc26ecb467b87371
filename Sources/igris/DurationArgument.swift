import ArgumentParser
import IgrisPolicy

/// `500ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
struct DurationArgument: ExpressibleByArgument, CustomStringConvertible {
    let nanoseconds: UInt64
    let text: String

    init?(argument: String) {
        guard let ns = DurationText.parse(argument) else { return nil }
        nanoseconds = ns
        text = argument
    }

    init(nanoseconds: UInt64) {
        self.nanoseconds = nanoseconds
        text = nanoseconds % 1_000_000_000 == 0 ? "\(nanoseconds / 1_000_000_000)s" : "\(nanoseconds / 1_000_000)ms"
    }

    var description: String { text }
    static var defaultCompletionKind: CompletionKind { .default }
}
