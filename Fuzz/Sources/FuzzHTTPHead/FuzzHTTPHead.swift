import FuzzSupport
import IgrisProtocols

/// Random bytes through the HTTP head parser (CONNECT and the admin endpoint's GETs) in
/// random-sized pieces. Invariants: no crash, never more than the 8 KiB limit buffered, and a
/// parsed head always yields a CONNECT request or a failure with a status.
func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 1 else { return 0 }
    let chunk = Int(data[0]) * 4 + 1
    var parser = HTTPHeadParser(limit: 8192)
    var offset = 1
    var total = 0
    while offset < size {
        let end = min(size, offset + chunk)
        let (consumed, event) = parser.feed(UnsafeRawBufferPointer(start: data + offset, count: end - offset))
        precondition(consumed <= end - offset)
        offset += consumed
        total += consumed
        precondition(total <= 8192, "buffered past the limit")
        switch event {
        case .needMore:
            continue
        case .head(let head):
            switch HTTPConnect.request(from: head) {
            case .success(let r): precondition(r.port != 0 && !r.host.isEmpty)
            case .failure(let f): precondition(f.status.rawValue >= 400)
            }
            return 0
        case .failure:
            return 0
        }
    }
    return 0
}

@main
enum Main {
    static func main() { runFuzzer(fuzz) }
}
