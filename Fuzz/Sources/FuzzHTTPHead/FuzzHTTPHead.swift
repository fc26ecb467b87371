import FuzzSupport
import IgrisProtocols

/// Random bytes through the HTTP head parser (CONNECT, absolute-form requests to forward, the
/// admin endpoint's GETs) in random-sized pieces. Invariants: no crash, never more than the
/// 8 KiB limit buffered; a parsed head always yields a request or a failure with a status; a
/// forwarded head is origin-form, ends with `Connection: close` and carries no proxy field;
/// the body framing never claims more bytes than it was given, nor any after it ended.
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
            case .success(let r):
                precondition(r.port != 0 && !r.host.isEmpty)
                if let forward = r.forward {
                    let text = String(decoding: forward.head, as: UTF8.self)
                    precondition(text.hasPrefix(head.method + " /") && text.hasSuffix("\r\nConnection: close\r\n\r\n"))
                    precondition(!text.lowercased().contains("\r\nproxy-authorization:"))
                    var framing = HTTPBodyFraming(forward.body)
                    while offset < size {
                        let end = min(size, offset + chunk)
                        let body = framing.consume(UnsafeRawBufferPointer(start: data + offset, count: end - offset))
                        precondition(body <= end - offset)
                        if body < end - offset {
                            precondition(framing.isComplete)
                            precondition(framing.consume(UnsafeRawBufferPointer(start: data + offset, count: end - offset)) == 0)
                            break
                        }
                        offset = end
                    }
                }
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
