import Glibc
/// One direction of a bridge: bytes read from one socket and written to the other.
///
/// At most one recv and one send are in flight, and at most two buffers are held: the one
/// being sent and one received while it was sent (`queued`). Nothing else is ever buffered,
/// so a slow reader stalls its writer instead of growing memory.
struct Direction {
    static let noBuffer: UInt16 = .max

    var recvArmed = false
    var sendArmed = false
    /// The read side reached EOF.
    var readEOF = false
    /// shutdown(SHUT_WR) queued on the write side.
    var shutdownQueued = false
    /// shutdown(SHUT_WR) completed: this direction is finished.
    var finished = false
    /// Waiting in the worker's ENOBUFS queue for a buffer.
    var waitingForBuffer = false
    var sendBuffer: UInt16 = noBuffer
    var sendOffset: UInt32 = 0
    var sendRemaining: UInt32 = 0
    var queuedBuffer: UInt16 = noBuffer
    var queuedLength: UInt32 = 0
    var bytes: UInt64 = 0
    /// A zero-copy send's result, held until its notification frees the buffer.
    var zeroCopyResult: Int32 = 0

    // Splice path (socket → pipe → socket). A direction is on one path at a time and only
    // changes path when the other has nothing in flight, so bytes never reorder.
    /// This direction moves bytes through a pipe.
    var splicing = false
    /// auto: switch to splice once the copy path is flushed.
    var wantSplice = false
    /// auto: consecutive recvs that filled a whole buffer.
    var fullReads: UInt8 = 0
    var pollInArmed = false
    var pollOutArmed = false
    var spliceInArmed = false
    var spliceOutArmed = false
    /// Borrowed only while bytes are in flight; -1 otherwise.
    var pipeRead: Int32 = -1
    var pipeWrite: Int32 = -1
    var pipeBytes: UInt32 = 0
    /// A rate-limited user's direction ran ahead of its budget: no recv until then (loop
    /// clock, ns; 0 when not throttled).
    var throttledUntil: UInt64 = 0
}

enum SlotState: UInt8 {
    case free
    /// SOCKS5 / HTTP CONNECT: reading the client's handshake (or waiting for its name to
    /// resolve, its password to verify).
    case handshake
    case connecting
    case bridging
    /// Both sockets are being closed; the slot is reused when nothing is in flight.
    case closing
}

/// A connection's whole user-space state: fixed size, preallocated, indexed by slot number.
/// An idle bridge holds just this (216 bytes) and its two sockets.
struct ConnectionSlot {
    // Small fields first and together: the layout follows declaration order, and this keeps
    // padding out of a struct there is one of per connection.
    var generation: UInt32 = 0
    var state: SlotState = .free
    var aborted = false
    var listener: UInt16 = 0
    /// Operations submitted and not yet completed (final completions only).
    var inflight: UInt16 = 0
    /// The user has a bandwidth limit: this bridge stays on the copy path and paces recvs.
    var rateLimited = false
    /// Why it closed, for the access log (set where the decision is made).
    var closeReason: CloseReason = .unknown
    var client: Int32 = -1
    var upstream: Int32 = -1
    /// forward: the pool server connected to (counted in its active connections), -1 none.
    var server: Int16 = -1
    /// The listener's splice setting, copied at accept (read per forwarded chunk).
    var splice: SpliceMode = .never
    /// Closing waits for a splice still reading from this socket (see Worker.closeSocket).
    var clientCloseDeferred = false
    var upstreamCloseDeferred = false
    var timerBucket: Int32 = -1
    var timerNext: Int32 = -1
    var timerPrevious: Int32 = -1
    /// Free-list / ENOBUFS-queue link.
    var nextFree: Int32 = -1
    var nextWaiter: Int32 = -1
    /// The handshake state of a SOCKS5 / HTTP CONNECT connection until it bridges; -1 after.
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
}

/// The access log's `reason`.
enum CloseReason: UInt8 {
    case unknown
    /// Both directions ended with EOF and were shut down: the normal end.
    case eof
    /// A reset or error on one side aborted the other.
    case reset
    case idleTimeout
    case connectFailed
    case connectTimeout
    case handshakeTimeout
    /// A handshake or PROXY header that was refused (malformed, unauthenticated, denied).
    case refused
    /// The client went away during the handshake.
    case clientGone
    case drainDeadline
    /// No descriptor or slot for it.
    case capacity
    /// forward: every server of the pool is down or was tried.
    case noServer

    var text: String {
        switch self {
        case .unknown: return "closed"
        case .eof: return "eof"
        case .reset: return "reset"
        case .idleTimeout: return "idle_timeout"
        case .connectFailed: return "connect_failed"
        case .connectTimeout: return "connect_timeout"
        case .handshakeTimeout: return "handshake_timeout"
        case .refused: return "refused"
        case .clientGone: return "client_gone"
        case .drainDeadline: return "drain_deadline"
        case .capacity: return "capacity"
        case .noServer: return "no_server"
        }
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

/// Byte offsets of the two directions inside a slot, computed once: a key path evaluated
/// per operation would allocate.
enum SlotLayout {
    static let toUpstreamOffset = MemoryLayout<ConnectionSlot>.offset(of: \ConnectionSlot.toUpstream)!
    static let toClientOffset = MemoryLayout<ConnectionSlot>.offset(of: \ConnectionSlot.toClient)!
}
