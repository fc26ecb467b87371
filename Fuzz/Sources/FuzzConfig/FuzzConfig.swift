import FuzzSupport
import IgrisEngine
import IgrisOperations
import IgrisPolicy

/// Random text as a configuration file and as a users file. Invariant: an error, never a
/// crash (Yams, the strict decoders, the semantic checks, the line lookup).
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size < 16384 else { return 0 }
    // Random host names must not each wait on a resolver.
    SocketAddress.numericHostsOnly = true
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    _ = try? ConfigFile.parse(text, file: "fuzz.yaml")
    _ = try? UserDirectory.parse(text, file: "fuzz.yaml")
    return 0
}

@main
enum Main {
    static func main() { runFuzzer(fuzz) }
}
