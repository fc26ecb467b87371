import ArgumentParser

struct Igris: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "igris",
        abstract: "A TCP gateway for VPN backends: bridges long-lived connections on io_uring (or epoll).",
        version: "0.1.0",
        subcommands: [Serve.self, Check.self, Probe.self, Passwd.self],
        defaultSubcommand: Serve.self
    )
}

/// A runtime failure already phrased for the operator.
struct CommandFailure: Error {
    let message: String
    init(_ message: String) { self.message = message }
}
