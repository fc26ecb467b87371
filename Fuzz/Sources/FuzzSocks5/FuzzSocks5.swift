import FuzzSupport
import IgrisProtocols

/// Random bytes through the SOCKS5 server handshake in random-sized pieces, answering as the
/// worker does. Invariants: no crash, every call takes at least one byte until the handshake
/// ends, never more than it was given.
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 1 else { return 0 }
    let chunk = Int(data[0] % 16) + 1
    let requireAuth = data[0] & 0x80 != 0
    var h = Socks5ServerHandshake()
    var offset = 1
    while offset < size && h.phase != .finished {
        let end = min(size, offset + chunk)
        let (consumed, event) = h.feed(UnsafeRawBufferPointer(start: data + offset, count: end - offset))
        precondition(consumed <= end - offset, "took more than it was given")
        precondition(consumed > 0, "made no progress")
        offset += consumed
        switch event {
        case .greeting(let methods):
            let m: Socks5.Method = requireAuth ? (methods.contains(2) ? .usernamePassword : .noAcceptableMethods)
                : (methods.contains(0) ? .noAuthentication : .noAcceptableMethods)
            h.select(m)
        case .credentials(let user, let password):
            precondition(!user.isEmpty && user.count <= 255 && password.count <= 255)
            h.authenticated()
        case .request(let r):
            if case .domain(let name) = r.address { precondition(!name.isEmpty && name.utf8.count <= 255) }
        case .failure(let f):
            precondition(!f.reply.isEmpty)
        case .needMore:
            break
        }
    }
    return 0
}

@main
enum Main {
    static func main() { runFuzzer(fuzz) }
}
