import FuzzSupport
import IgrisProtocols

/// Random bytes as a client's SOCKS5 UDP datagram. Invariants: no crash; a parsed header
/// never claims more bytes than the datagram has; its address and port, encoded again, make
/// the very header parsed (so what a reply names is what the request named).
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    guard case .success(let header) = Socks5UDP.parse(bytes) else { return 0 }
    precondition(header.length <= size)
    let encoded = Socks5UDP.header(from: header.address, port: header.port)
    precondition(encoded.count == header.length && encoded.elementsEqual(bytes[0..<header.length]))
    return 0
}

@main
enum Main {
    static func main() { runFuzzer(fuzz) }
}
