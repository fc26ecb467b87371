import ArgumentParser
import Glibc
import IgrisPolicy

/// `igris passwd`: reads a password and prints its argon2id hash for the users file.
struct Passwd: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Hash a password for the users file (argon2id).",
        discussion: """
            Reads the password from the terminal (twice, without echo) or, when stdin is not a \\
            terminal, its first line. Prints the hash to paste as password_hash; with --user, a \\
            users file with that one user (`igris passwd --user alice > users.yaml`), or with \\
            --entry only the entry, to append to an existing file's `users:` list.
            """
    )

    @Option(help: "Print a users file with this user instead of the bare hash.")
    var user: String?

    @Flag(help: "With --user: print only the entry, to append to an existing users file (>> users.yaml).")
    var entry = false

    func validate() throws {
        if entry && user == nil { throw ValidationError("--entry needs --user NAME") }
        if let user {
            if user.isEmpty || user.utf8.count > 255 { throw ValidationError("--user must be 1 to 255 bytes (the SOCKS5 limit, RFC 1929)") }
            if user.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) {
                throw ValidationError("--user must not contain control characters")
            }
        }
    }

    func run() throws {
        let interactive = isatty(STDIN_FILENO) == 1
        guard let password = Self.readPassword(prompt: interactive ? "Password: " : nil) else {
            throw CommandFailure("no password given on stdin")
        }
        if interactive {
            guard let again = Self.readPassword(prompt: "Again: "), again == password else {
                throw CommandFailure("the passwords differ")
            }
        }
        if password.isEmpty { throw CommandFailure("empty password") }
        if password.count > 255 { throw CommandFailure("password longer than 255 bytes (the SOCKS5 limit, RFC 1929)") }
        let hash: String
        do {
            hash = try PasswordHasher.hash(password)
        } catch {
            throw CommandFailure("\(error)")
        }
        if let user {
            let name = user.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            print((entry ? "" : "users:\n") + "  - name: \"\(name)\"\n    password_hash: \"\(hash)\"")
        } else {
            print(hash)
        }
    }

    /// One line without its newline; echo off while a terminal is reading it.
    static func readPassword(prompt: String?) -> [UInt8]? {
        var saved = termios()
        let terminal = prompt != nil && tcgetattr(STDIN_FILENO, &saved) == 0
        if let prompt {
            FileDescriptorOutput.standardError.write(prompt)
        }
        if terminal {
            var quiet = saved
            quiet.c_lflag &= ~tcflag_t(ECHO)
            tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet)
        }
        defer {
            if terminal {
                tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved)
                FileDescriptorOutput.standardError.write("\n")
            }
        }
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while read(STDIN_FILENO, &byte, 1) == 1 {
            if byte == UInt8(ascii: "\n") { return line.last == 13 ? Array(line.dropLast()) : line }
            line.append(byte)
            if line.count > 4096 { return nil }
        }
        return line.isEmpty ? nil : line
    }
}
