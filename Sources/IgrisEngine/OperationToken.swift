/// What an operation was for; bits 0–6 of its token. Bridge operations name their
/// direction in bit 7 (`OperationToken.direction`), so each kind exists once.
public enum OperationKind: UInt8, Sendable {
    case none = 0
    case accept          // index = listener
    case connect         // index = slot
    /// A direction's read side: recv (copy path), poll for input and socket → pipe (splice).
    case recv
    case pollIn
    case spliceIn
    /// A direction's write side: send (copy path), pipe → socket, poll for room (splice),
    /// and shutdown(SHUT_WR) once its source reached EOF.
    case send
    case spliceOut
    case pollOut
    case shutdown
    /// One of the slot's sockets closed; the direction bit names it (0: client, 1: upstream).
    case close
    case wake            // index = 0: the worker's eventfd became readable
    case closeListener   // index = listener
    /// A negotiating connection's client has input (handshake bytes, PROXY header).
    case negotiationReadable
    /// index = health probe, generation = its attempt's sequence.
    case healthConnect
    case healthClose
    /// Copy path: the destination has room again (a poll for writable).
    case room
    /// A UDP association's socket has datagrams: direction 0 the relay (from the client),
    /// 1 the outbound socket (from destinations).
    case datagramReadable
}

/// The 64-bit tag of every submitted operation: slot (or listener) index, the slot's
/// generation when submitted, the direction bit and the kind. Never an object pointer, so a
/// completion that arrives after its slot was reused is recognised by its generation and
/// dropped. Bit 63 is the backends' own (an index is below 2^31).
public struct OperationToken: Equatable, Sendable {
    public let raw: UInt64

    /// Tag for completions nobody waits for (cancellations), and "no operation".
    public static let ignored = OperationToken(raw: 0)

    @inline(__always)
    public init(raw: UInt64) { self.raw = raw }

    @inline(__always)
    public init(index: UInt32, generation: UInt32, kind: OperationKind, direction: Int = 0) {
        raw = UInt64(index & 0x7FFF_FFFF) << 32 | UInt64(generation & 0xFF_FFFF) << 8
            | UInt64(direction & 1) << 7 | UInt64(kind.rawValue)
    }

    @inline(__always) public var index: UInt32 { UInt32(truncatingIfNeeded: raw >> 32) & 0x7FFF_FFFF }
    @inline(__always) public var generation: UInt32 { UInt32(truncatingIfNeeded: raw >> 8) & 0xFF_FFFF }
    @inline(__always) public var direction: Int { Int(truncatingIfNeeded: raw >> 7) & 1 }
    @inline(__always) public var kind: OperationKind { OperationKind(rawValue: UInt8(truncatingIfNeeded: raw) & 0x7F) ?? .none }
    @inline(__always) public var isNone: Bool { raw == 0 }
}

/// The operations still pending on a socket that is being closed, as its owner knows them:
/// at most one on its read side and one on its write side (or its connect).
public struct PendingOperations: Sendable {
    public var read: OperationToken
    public var write: OperationToken

    @inline(__always)
    public init(read: OperationToken = .ignored, write: OperationToken = .ignored) {
        self.read = read
        self.write = write
    }

    public static let none = PendingOperations()
}

/// A finished operation. `result` follows io_uring: ≥ 0 success (bytes, fd), < 0 is -errno.
public struct Completion: Sendable {
    public var token: OperationToken
    public var result: Int32
    /// The provided buffer the kernel (or the epoll emulation) filled, if any.
    public var bufferID: UInt16?
    /// A multishot accept stays armed and will complete again.
    public var more: Bool

    @inline(__always)
    public init(token: OperationToken, result: Int32, bufferID: UInt16? = nil, more: Bool = false) {
        self.token = token
        self.result = result
        self.bufferID = bufferID
        self.more = more
    }
}
