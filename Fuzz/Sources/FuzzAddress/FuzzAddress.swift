import FuzzSupport
import IgrisPolicy

/// Random addresses through the default destination ACL. Invariants: every text form of an
/// address parses back to it and gets the same decision; an IPv4 address gets the same
/// decision in every IPv6 form that carries it (IPv4-mapped, NAT64, the local-use NAT64
/// prefix, 6to4, Teredo with the client inverted), so no form slips past the deny list.
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size >= 16 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: 16))
    let acl = DestinationACL()
    let address = IPAddress(ipv6: bytes)
    let port = size >= 18 ? UInt16(data[16]) << 8 | UInt16(data[17]) : 443
    let decision = acl.permits(address, port: port)

    // Its own text, and the IPv6 text with no :: compression, parse back to it.
    guard let back = IPAddress(Substring(address.description)) else { preconditionFailure("\(address) does not parse back") }
    precondition(back == address && acl.permits(back, port: port) == decision, "\(address): text form decides differently")
    let groups = stride(from: 0, to: 16, by: 2).map { String(UInt16(bytes[$0]) << 8 | UInt16(bytes[$0 + 1]), radix: 16) }
    let expanded = IPAddress(Substring(groups.joined(separator: ":")))
    precondition(expanded == address, "\(groups.joined(separator: ":")) parses to \(String(describing: expanded)), not \(address)")

    // An IPv4 address (the first 4 bytes) in every form that carries it.
    let (a, b, c, d) = (bytes[0], bytes[1], bytes[2], bytes[3])
    let v4 = IPAddress(ipv4: a, b, c, d)
    let expected = acl.permits(v4, port: port)
    let hex = { (x: UInt8, y: UInt8) in String(UInt16(x) << 8 | UInt16(y), radix: 16) }
    let inverted = { (x: UInt8, y: UInt8) in String(~(UInt16(x) << 8 | UInt16(y)), radix: 16) }
    let forms = [
        "\(a).\(b).\(c).\(d)",
        "::ffff:\(a).\(b).\(c).\(d)",
        "::ffff:\(hex(a, b)):\(hex(c, d))",
        "64:ff9b::\(hex(a, b)):\(hex(c, d))",
        "64:ff9b:1::\(hex(a, b)):\(hex(c, d))",
        "2002:\(hex(a, b)):\(hex(c, d))::\(hex(bytes[4], bytes[5]))",
        "2001:0:\(hex(bytes[4], bytes[5])):\(hex(bytes[6], bytes[7])):0:0:\(inverted(a, b)):\(inverted(c, d))",
    ]
    for form in forms {
        guard let parsed = IPAddress(Substring(form)) else { preconditionFailure("\(form) does not parse") }
        precondition(acl.permits(parsed, port: port) == expected,
                     "\(form) decides \(acl.permits(parsed, port: port)), \(a).\(b).\(c).\(d) decides \(expected)")
    }
    return 0
}

@main
enum Main {
    static func main() { runFuzzer(fuzz) }
}
