import ArgumentParser
import IgrisNegotiation
import IgrisOperations

/// `igris check -c FILE`: validates a configuration (and the users file it names) without
/// starting anything; each error names its key path and line; non-zero exit when invalid.
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Validate a configuration file (and its users file).")

    @Option(name: [.customShort("c"), .customLong("config")], help: "Configuration file (YAML).")
    var configFile: String

    func run() throws {
        let file: ConfigFile
        do {
            file = try ConfigFile.load(path: configFile)
            let gateway = Gateway(policy: try file.policy(configPath: configFile), offloadThreads: 1)
            defer { gateway.shutdown() }
            _ = try file.listenerRules(gateway: gateway)
        } catch {
            throw CommandFailure(String(describing: error))
        }
        let modes = file.listeners.map { "\($0.name) (\($0.mode.rawValue) on \($0.listenText))" }.joined(separator: ", ")
        print("\(configFile): ok — \(file.listeners.count) listener\(file.listeners.count == 1 ? "" : "s"): \(modes)")
    }
}
