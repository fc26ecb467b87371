import ArgumentParser
import IgrisEngine

// Every error reaches the operator as one line on stderr and a non-zero exit (help and
// --version excepted): ArgumentParser's usage block is left to `--help`.
do {
    var command = try Igris.parseAsRoot()
    try command.run()
} catch {
    if Igris.exitCode(for: error) == .success { Igris.exit(withError: error) }
    let message: String
    if let failure = error as? CommandFailure {
        message = failure.message
    } else {
        message = Igris.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
    }
    FileDescriptorOutput.standardError.write("igris: \(message)\n")
    Igris.exit(withError: ExitCode(Igris.exitCode(for: error) == .validationFailure ? 64 : 1))
}
