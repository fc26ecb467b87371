/// The server side of a SOCKS5 handshake as an incremental parser: fed bytes as they arrive,
/// in any split, it reports each complete message (greeting, credentials, request) and how
/// many bytes that message took, so bytes after the request (a client that sends data
/// before the reply) stay unread for the bridge. No I/O; every message is bounded by its
/// format (at most 2 + 255, 3 + 255 + 255 and 7 + 255 bytes).
public struct Socks5ServerHandshake: Sendable {
    public enum Phase: Equatable, Sendable {
        case greeting
        case authentication
        case request
        /// A request or failure was reported; nothing more is parsed.
        case finished
    }

    public enum Event: Equatable, Sendable {
        /// Every byte given was taken; the message is not complete yet.
        case needMore
        /// The methods the client offers. Answer with `select(_:)`.
        case greeting(methods: [UInt8])
        /// RFC 1929 username and password (raw bytes: not necessarily UTF-8).
        case credentials(username: [UInt8], password: [UInt8])
        case request(Socks5.Request)
        case failure(Socks5.Failure)
    }

    public private(set) var phase: Phase = .greeting
    private var pending: [UInt8] = []

    public init() {
        pending.reserveCapacity(64)
    }

    /// The server chose `method` after `.greeting`: username/password goes on to the
    /// sub-negotiation, no-authentication straight to the request, anything else ends it.
    public mutating func select(_ method: Socks5.Method) {
        precondition(phase == .greeting)
        switch method {
        case .noAuthentication: phase = .request
        case .usernamePassword: phase = .authentication
        case .noAcceptableMethods: phase = .finished
        }
    }

    /// The credentials were accepted: the request comes next.
    public mutating func authenticated() {
        precondition(phase == .authentication)
        phase = .request
    }

    /// Takes bytes up to the end of the first complete message and reports it. `consumed`
    /// < `bytes.count` only when a message ended (or failed) before the input did.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer) -> (consumed: Int, event: Event) {
        var i = 0
        while i < bytes.count {
            guard phase != .finished else { return (i, .failure(.malformedRequest)) }
            pending.append(bytes[i])
            i += 1
            switch requiredLength() {
            case .failure(let f):
                phase = .finished
                pending.removeAll()
                return (i, .failure(f))
            case .length(let n) where n == pending.count:
                let event = complete()
                pending.removeAll(keepingCapacity: true)
                return (i, event)
            case .length:
                continue
            }
        }
        return (i, .needMore)
    }

    private enum Need {
        case length(Int)
        case failure(Socks5.Failure)
    }

    /// How long the current message is, as far as the bytes so far tell.
    private func requiredLength() -> Need {
        let n = pending.count
        switch phase {
        case .greeting:
            if pending[0] != Socks5.version { return .failure(.unsupportedVersion(pending[0])) }
            return n < 2 ? .length(2) : .length(2 + Int(pending[1]))
        case .authentication:
            if pending[0] != Socks5.authVersion { return .failure(.malformedCredentials) }
            if n < 2 { return .length(2) }
            let userLength = Int(pending[1])
            if userLength == 0 { return .failure(.malformedCredentials) }
            if n < 3 + userLength { return .length(3 + userLength) }
            return .length(3 + userLength + Int(pending[2 + userLength]))
        case .request:
            if pending[0] != Socks5.version { return .failure(.malformedRequest) }
            if n < 4 { return .length(4) }
            if pending[2] != 0 { return .failure(.malformedRequest) }
            switch Socks5.AddressType(rawValue: pending[3]) {
            case .ipv4: return .length(10)
            case .ipv6: return .length(22)
            case .domainName:
                if n < 5 { return .length(5) }
                if pending[4] == 0 { return .failure(.malformedRequest) }
                return .length(7 + Int(pending[4]))
            case nil: return .failure(.addressTypeNotSupported(pending[3]))
            }
        case .finished:
            return .failure(.malformedRequest)
        }
    }

    private mutating func complete() -> Event {
        switch phase {
        case .greeting:
            return .greeting(methods: Array(pending[2...]))
        case .authentication:
            let userLength = Int(pending[1])
            let username = Array(pending[2..<2 + userLength])
            let password = Array(pending[(3 + userLength)...])
            return .credentials(username: username, password: password)
        case .request:
            phase = .finished
            let port = UInt16(pending[pending.count - 2]) << 8 | UInt16(pending[pending.count - 1])
            let address: Socks5.Address
            switch Socks5.AddressType(rawValue: pending[3])! {
            case .ipv4: address = .ipv4(pending[4], pending[5], pending[6], pending[7])
            case .ipv6: address = .ipv6(Array(pending[4..<20]))
            case .domainName:
                let name = pending[5..<(pending.count - 2)]
                // Host names are printable ASCII; anything else cannot be resolved and may be
                // an attempt to smuggle bytes into logs.
                guard name.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else { return .failure(.malformedRequest) }
                address = .domain(String(decoding: name, as: UTF8.self))
            }
            guard let command = Socks5.Command(rawValue: pending[1]), command == .connect || command == .udpAssociate else {
                return .failure(.commandNotSupported(pending[1]))
            }
            return .request(Socks5.Request(command: command, address: address, port: port))
        case .finished:
            return .failure(.malformedRequest)
        }
    }
}
