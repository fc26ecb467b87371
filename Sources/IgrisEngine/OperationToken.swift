import Glibc
/// What an operation was for; the low 8 bits of its token.
public enum OperationKind: UInt8, Sendable {
    case none = 0
    case accept          // index = listener
    case connect         // index = slot
    case recvClient      // read from the client (direction 0: client → upstream)
    case recvUpstream    // read from the upstream (direction 1: upstream → client)
    case sendUpstream    // direction 0's write side
    case sendClient      // direction 1's write side
    case shutdownUpstream
    case shutdownClient
    case closeClient
    case closeUpstream
    case wake            // index = 0: the worker's eventfd became readable
    case closeListener   // index = listener
    // Splice path, per direction: wait for the source readable, socket → pipe, pipe →
    // socket, wait for the destination writable.
    case pollInClient
    case pollInUpstream
    case spliceInClient
    case spliceInUpstream
    case spliceOutUpstream
    case spliceOutClient
    case pollOutUpstream
    case pollOutClient
    /// SOCKS5 / HTTP CONNECT: the client's handshake bytes are readable.
    case handshakeReadable
    /// index = health probe, generation = its attempt's sequence.
    case healthConnect
    case healthClose
}

/// The 64-bit tag of every submitted operation: slot (or listener) index, the slot's
/// generation when submitted, and the kind. Never an object pointer, so a completion that
/// arrives after its slot was reused is recognised by its generation and dropped.
public struct OperationToken: Equatable, Sendable {
    public let raw: UInt64

    /// Tag for completions nobody waits for (the cancel half of cancel+close).
    public static let ignored = OperationToken(raw: 0)

    @inline(__always)
    public init(raw: UInt64) { self.raw = raw }

    @inline(__always)
    public init(index: UInt32, generation: UInt32, kind: OperationKind) {
        raw = UInt64(index) << 32 | UInt64(generation & 0xFF_FFFF) << 8 | UInt64(kind.rawValue)
    }

    @inline(__always) public var index: UInt32 { UInt32(truncatingIfNeeded: raw >> 32) }
    @inline(__always) public var generation: UInt32 { UInt32(truncatingIfNeeded: raw >> 8) & 0xFF_FFFF }
    @inline(__always) public var kind: OperationKind { OperationKind(rawValue: UInt8(truncatingIfNeeded: raw)) ?? .none }
}

/// A finished operation. `result` follows io_uring: ≥ 0 success (bytes, fd), < 0 is -errno.
public struct Completion: Sendable {
    public var token: OperationToken
    public var result: Int32
    /// The provided buffer the kernel (or the epoll emulation) filled, if any.
    public var bufferID: UInt16?
    /// A multishot operation stays armed and will complete again; for a zero-copy send, the
    /// send's result is here and a notification follows when the kernel lets go of the buffer.
    public var more: Bool
    /// The notification of a zero-copy send: its buffer may be reused now.
    public var notification: Bool

    @inline(__always)
    public init(token: OperationToken, result: Int32, bufferID: UInt16? = nil, more: Bool = false, notification: Bool = false) {
        self.token = token
        self.result = result
        self.bufferID = bufferID
        self.more = more
        self.notification = notification
    }
}
