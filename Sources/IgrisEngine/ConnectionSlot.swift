import Glibc
/// One direction of a bridge: bytes read from `source` and written to `destination`
/// (direction 0: client → upstream, 1: upstream → client).
///
/// At most one read-side and one write-side operation are in flight, and on the copy path at
/// most two buffers are held: the one being sent and one received meanwhile (`queued`).
/// A direction reads only what its destination can take at once (`room`), and holds no
/// buffer while it waits for room: a slow reader's bytes wait in the kernel's socket
/// buffers, with TCP backpressure, not in the pool. A direction is on one path at a time and only changes path when the other has
/// nothing in flight, so bytes never reorder.
struct Direction {
    static let noBuffer: UInt16 = .max

    /// What the read side is doing.
    enum Reading: UInt8 {
        /// Nothing armed: a buffer is queued behind the send, the user's rate limit paused
        /// it, or the copy path is draining before the move to splice.
        case idle
        case recv
        /// In the worker's ENOBUFS queue, waiting for a pool buffer.
        case waitingForBuffer
        /// Splice path: waiting for the source to have input before taking a pipe.
        case pollIn
        case spliceIn
        /// The source reached EOF; nothing more is read.
        case eof
    }

    /// What the write side is doing.
    enum Writing: UInt8 {
        case idle
        case send
        case spliceOut
        /// Splice path: waiting for room in the destination.
        case pollOut
        /// Copy path: waiting for room in the destination before reading (no buffer held).
        case waitingForRoom
        /// shutdown(SHUT_WR) queued after the source's EOF.
        case shutdown
        /// The shutdown completed: this direction is finished.
        case finished
    }

    enum Path: UInt8 {
        case copy
        /// auto: bulk was seen; the copy path drains, then the direction splices.
        case copyThenSplice
        case splice
    }

    var source: Int32 = -1
    var destination: Int32 = -1
    var reading: Reading = .idle
    var writing: Writing = .idle
    var path: Path = .copy
    /// auto: consecutive recvs that filled a whole buffer.
    var fullReads: UInt8 = 0
    /// Bytes the destination's send buffer takes without blocking, at least: measured by
    /// `Worker.destinationRoom`, less every byte received for it since.
    var room: UInt32 = 0
    var sendBuffer: UInt16 = noBuffer
    var queuedBuffer: UInt16 = noBuffer
    var sendOffset: UInt32 = 0
    var sendRemaining: UInt32 = 0
    var queuedLength: UInt32 = 0
    /// Splice path: borrowed only while bytes are in flight; -1 otherwise.
    var pipeRead: Int32 = -1
    var pipeWrite: Int32 = -1
    var pipeBytes: UInt32 = 0
    var bytes: UInt64 = 0
    /// A rate-limited user's direction ran ahead of its budget: no read until then (loop
    /// clock, ns; 0 when not throttled).
    var throttledUntil: UInt64 = 0

    /// The operation in flight on the read side (source socket), for a close to cancel.
    @inline(__always)
    func pendingRead(_ base: OperationToken) -> OperationToken {
        switch reading {
        case .recv: return OperationToken(raw: base.raw | UInt64(OperationKind.recv.rawValue))
        case .pollIn: return OperationToken(raw: base.raw | UInt64(OperationKind.pollIn.rawValue))
        case .spliceIn: return OperationToken(raw: base.raw | UInt64(OperationKind.spliceIn.rawValue))
        case .idle, .waitingForBuffer, .eof: return .ignored
        }
    }

    /// The operation in flight on the write side (destination socket).
    @inline(__always)
    func pendingWrite(_ base: OperationToken) -> OperationToken {
        switch writing {
        case .send: return OperationToken(raw: base.raw | UInt64(OperationKind.send.rawValue))
        case .pollOut: return OperationToken(raw: base.raw | UInt64(OperationKind.pollOut.rawValue))
        case .waitingForRoom: return OperationToken(raw: base.raw | UInt64(OperationKind.room.rawValue))
        case .spliceOut: return OperationToken(raw: base.raw | UInt64(OperationKind.spliceOut.rawValue))
        case .shutdown: return OperationToken(raw: base.raw | UInt64(OperationKind.shutdown.rawValue))
        case .idle, .finished: return .ignored
        }
    }
}

/// Bits of `ConnectionSlot.tls`.
enum TLSSides {
    /// The client side is TLS (`Worker.clientTLS` holds its session).
    static let client: UInt8 = 1
    /// The upstream side is TLS (`Worker.upstreamTLS`).
    static let upstream: UInt8 = 2
    /// Handshaking with the client (the slot is `.negotiating`).
    static let clientHandshake: UInt8 = 4
    /// Handshaking with the upstream (the slot is `.connecting`).
    static let upstreamHandshake: UInt8 = 8
    /// A poll for the upstream's handshake bytes is in flight.
    static let upstreamPollArmed: UInt8 = 16
    /// The client side's TLS went to the kernel (kTLS) after the handshake: plain from here.
    static let clientInKernel: UInt8 = 32
    /// The bits that make a side's bytes pass through a session.
    static let sessions: UInt8 = client | upstream

    /// The TLS bit of the socket a direction reads from (its source) or writes to.
    @inline(__always) static func source(_ d: Int) -> UInt8 { d == 0 ? client : upstream }
    @inline(__always) static func destination(_ d: Int) -> UInt8 { d == 0 ? upstream : client }
}

enum SlotState: UInt8 {
    case free
    /// SOCKS5 / HTTP CONNECT / PROXY header: the connection's negotiator reads the client
    /// (or waits for a name to resolve, a password to verify).
    case negotiating
    case connecting
    case bridging
    /// A SOCKS5 UDP association: the client connection is its control connection, watched
    /// only for its end; datagrams go through the association's sockets (`UDPRelay.swift`).
    case associated
    /// Both sockets are being closed; the slot is reused when nothing is in flight.
    case closing
}

/// A connection's whole user-space state: fixed size, preallocated, indexed by slot number.
/// An idle bridge holds just this (see `slotStaysSmall`) and its two sockets.
struct ConnectionSlot {
    // Small fields first and together: the layout follows declaration order, and this keeps
    // padding out of a struct there is one of per connection.
    var generation: UInt32 = 0
    var state: SlotState = .free
    /// A negotiation poll is in flight on the client.
    var negotiationPollArmed = false
    /// The upstream connect is in flight.
    var connectArmed = false
    /// Client → upstream carries one request body and then nothing (`Worker.uploadFramings`).
    var framedUpload = false
    var listener: UInt16 = 0
    /// Operations submitted and not yet completed (final completions only).
    var inflight: UInt16 = 0
    /// The user has a bandwidth limit: this bridge stays on the copy path and paces recvs.
    var rateLimited = false
    /// Why it closed, for the access log (set where the decision is made).
    var closeReason: CloseReason = .unknown
    /// forward: the pool server connected to (counted in its active connections), -1 none.
    var server: Int16 = -1
    /// The listener's splice setting, copied at accept (read per forwarded chunk).
    var splice: SpliceMode = .never
    /// Counted in `SourceLimits` (its key is in `Worker.sourceKeys`), and as negotiating.
    var sourceCounted = false
    var handshakeCounted = false
    /// The negotiation waits for work done elsewhere (a password check, a name): the
    /// client is watched only for going away, so that work can be dropped.
    var awaitingAnswer = false
    /// Which sides speak TLS and where their handshakes are (`TLSSides`).
    var tls: UInt8 = 0
    var timerBucket: Int32 = -1
    var timerNext: Int32 = -1
    var timerPrevious: Int32 = -1
    /// Free-list link.
    var nextFree: Int32 = -1
    /// The negotiation (SOCKS5, HTTP CONNECT, PROXY header) until it bridges; -1 after.
    var session: Int32 = -1
    /// The authenticated user (index into the users file), holding one of its connections.
    var user: Int32 = -1
    var timerDeadline: UInt64 = 0
    /// Last time bytes moved (ns, loop clock), for the idle timeout.
    var lastActivity: UInt64 = 0
    var openedAt: UInt64 = 0
    /// forward: servers already tried by this connection (bit per server).
    var triedServers: UInt64 = 0
    /// [0]: client → upstream, [1]: upstream → client.
    var toUpstream = Direction()
    var toClient = Direction()

    var client: Int32 { toUpstream.source }
    var upstream: Int32 { toClient.source }

    mutating func setClient(_ fd: Int32) {
        toUpstream.source = fd
        toClient.destination = fd
    }

    mutating func setUpstream(_ fd: Int32) {
        toClient.source = fd
        toUpstream.destination = fd
    }
}

/// The preallocated slot array of one worker. Slots are handed out from a free list and,
/// before that, from a high-water mark, so pages of the table that were never used are never
/// touched (they stay non-resident: the table costs memory only for connections it had).
@_spi(Benchmarks) public final class ConnectionTable {
    let capacity: Int
    private let slots: UnsafeMutablePointer<ConnectionSlot>
    private var highWater: Int32 = 0
    private var freeHead: Int32 = -1
    private(set) var active = 0

    public init(capacity: Int) {
        self.capacity = capacity
        slots = .allocate(capacity: capacity)
    }

    deinit {
        slots.deinitialize(count: Int(highWater))
        slots.deallocate()
    }

    @inline(__always)
    func pointer(_ index: Int32) -> UnsafeMutablePointer<ConnectionSlot> { slots + Int(index) }

    /// A free slot in state `.connecting` with a new generation, or nil when full.
    public func allocate() -> Int32? {
        let index: Int32
        if freeHead >= 0 {
            index = freeHead
            freeHead = slots[Int(index)].nextFree
            let generation = slots[Int(index)].generation
            slots[Int(index)] = ConnectionSlot()
            slots[Int(index)].generation = generation
        } else if Int(highWater) < capacity {
            index = highWater
            highWater += 1
            (slots + Int(index)).initialize(to: ConnectionSlot())
        } else {
            return nil
        }
        active += 1
        return index
    }

    /// Returns a slot; its generation moves on so late completions for it are recognised.
    public func release(_ index: Int32) {
        let p = slots + Int(index)
        p.pointee.generation = (p.pointee.generation &+ 1) & 0xFF_FFFF
        p.pointee.state = .free
        p.pointee.nextFree = freeHead
        freeHead = index
        active -= 1
    }

    /// Every slot ever handed out (for drain: abort what's left).
    var used: Int32 { highWater }
}
