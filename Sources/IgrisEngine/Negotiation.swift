import IgrisProtocols
import Logging

/// What a listener negotiates with each client before the engine connects anywhere: a
/// SOCKS5 or HTTP CONNECT handshake, a balancer's PROXY header. The engine owns the socket
/// and every byte moved; a negotiation only reads what the client sent and answers with an
/// action. Implementations live above the engine (IgrisNegotiation); a port forward without
/// a PROXY header has none and never enters that code.
public protocol NegotiatorFactory: AnyObject, Sendable {
    /// "socks5", "http_connect", "proxy_header": logs and metrics.
    var name: String { get }
    /// Everything that decides how new connections are treated, as text: a reload keeps a
    /// listener whose name and signature did not change.
    var signature: String { get }
    /// The whole negotiation (greeting to request, or the PROXY header) must arrive within this.
    var timeoutNanoseconds: UInt64 { get }
    /// One negotiation per accepted connection, made on its worker's thread.
    func makeNegotiation(_ context: NegotiationContext) -> any Negotiation
}

/// A connection's negotiation. Called only on its worker's thread, one call at a time.
public protocol Negotiation: AnyObject {
    /// Bytes the client has sent that no earlier call consumed. Returns how many belong to
    /// the negotiation (one message at most; the engine takes exactly those off the socket,
    /// so bytes a client pipelines after its request stay there for the bridge) and what next.
    func received(_ bytes: UnsafeRawBufferPointer) -> (consumed: Int, action: NegotiationAction)
    /// Work the negotiation handed off (`NegotiationContext.resume`) has answered.
    func resumed(_ value: any Sendable) -> NegotiationAction
    /// The connect of the last `.connect`: `error` 0 with the upstream's local address, or
    /// the errno it failed with (the socket is closed). Next: `.bridge`, another `.connect`,
    /// or `.close`.
    func connected(error: Int32, local: SocketAddress?) -> NegotiationAction
    /// The connect timeout passed: the reply to send before the connection closes.
    func connectTimedOut() -> [UInt8]
    /// The users-file account this connection belongs to, -1 for none. It holds one of the
    /// account's connections from its first `.connect` on; the engine releases it at close.
    var account: Int32 { get }
    /// A PROXY header said who the client really is: sent onwards instead of the socket's.
    var proxied: (source: SocketAddress, destination: SocketAddress)? { get }
    /// Who and where, as text, for the access log.
    var clientDescription: String { get }
    var destinationDescription: String { get }
}

/// The destination side of a UDP association (SOCKS5 UDP ASSOCIATE): the negotiation that
/// set it up decides where each datagram goes and what the client sees of replies. Called on
/// the worker's thread.
public protocol DatagramPolicy: AnyObject {
    /// The relay is open at `relay` (nil: it could not be): the reply for the client, and
    /// `.read` to keep the association, or `.close`.
    func associated(relay: SocketAddress?) -> NegotiationAction
    /// A datagram from the client: where its payload (from `payloadOffset`) goes.
    func route(_ datagram: UnsafeRawBufferPointer) -> DatagramRoute
    /// A datagram from `source` for the client: writes the header to put before it at the
    /// start of `header` (room for 22 bytes) and returns its length; nil: `source` is not a
    /// destination of this association, and the datagram is dropped.
    func writeReplyHeader(from source: SocketAddress, into header: UnsafeMutableRawBufferPointer) -> Int?
    /// Datagrams held for a name that has resolved since (`resumed` said so): send them now.
    func takeResolved() -> [(destination: SocketAddress, payload: [UInt8])]
}

public enum DatagramRoute {
    case send(SocketAddress, payloadOffset: Int)
    /// Held while its destination name resolves (bounded by the policy).
    case held
    case drop(DatagramDrop)
}

/// Why a datagram was dropped (`igris_udp_dropped_total{reason}`).
public enum DatagramDrop: Int, Error, CaseIterable, Sendable {
    case malformed
    case fragmented
    case foreignSource
    case denied
    case unresolved
    case limit
    case sendFailed

    public var label: String {
        switch self {
        case .malformed: return "malformed"
        case .fragmented: return "fragmented"
        case .foreignSource: return "foreign_source"
        case .denied: return "denied"
        case .unresolved: return "unresolved"
        case .limit: return "limit"
        case .sendFailed: return "send_failed"
        }
    }
}

/// What the engine does after a negotiation call: send `reply` to the client (if any),
/// then `next`.
public struct NegotiationAction: Sendable {
    public enum Next: Sendable, Equatable {
        /// Wait for more bytes from the client.
        case read
        /// Wait for `Negotiation.resumed`.
        case wait
        /// Connect to this address (the listener's connect timeout applies).
        case connect(SocketAddress)
        /// Negotiation done: connect as the listener does without one (its pool).
        case connectListenerPool
        /// Start bridging (after a successful `connect`).
        case bridge
        /// Open a UDP relay for this client (the negotiation is a `DatagramPolicy`): datagrams
        /// from `client` (its address as the socket sees it; port 0: learnt from its first).
        case associate(clientPort: UInt16)
        /// Close after the reply (FIN, not RST, so the reply is read).
        case close(CloseReason)
    }

    public var reply: [UInt8]
    public var next: Next
    /// `.bridge`: bytes for the destination before anything of the client's (a forwarded
    /// HTTP request's rewritten head).
    public var destinationPreamble: [UInt8] = []
    /// `.bridge`: the client → destination direction carries this request body and nothing
    /// after it (what a client pipelines behind a forwarded request is not this origin's).
    public var uploadFraming: HTTPBodyFraming.Kind?

    public init(reply: [UInt8] = [], _ next: Next) {
        self.reply = reply
        self.next = next
    }

    public static let read = NegotiationAction(.read)
    public static let wait = NegotiationAction(.wait)
}

/// What a negotiation knows of its connection when it starts.
public struct NegotiationContext: Sendable {
    /// The client as the socket sees it (nil if the socket could not say).
    public var client: SocketAddress?
    public var listener: String
    /// The worker's counters (handshake failures, ACL denials, …).
    public var statistics: WorkerStatistics
    public var logger: Logger
    /// Hands a result of work done elsewhere back to this negotiation, on its worker.
    public var resume: NegotiationResumer
    /// A verified client certificate already named this users-file account (the engine
    /// holds one of its connections): no password is asked. -1: none.
    public var authenticatedAccount: Int32 = -1
}

/// Posts a value to the worker that owns a negotiation; `Negotiation.resumed` receives it
/// there, unless the connection closed meanwhile (then the value is dropped).
public struct NegotiationResumer: Sendable {
    let mailbox: WorkerMailbox
    let slot: Int32
    let generation: UInt32

    public func callAsFunction(_ value: any Sendable) {
        mailbox.post(MailboxItem(slot: slot, generation: generation, value: value))
    }
}

/// Why a connection closed, for the access log's `reason`.
public enum CloseReason: UInt8, Sendable {
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
    /// A peer stopped answering keepalive probes or acknowledging bytes (dead_peer_timeout).
    case deadPeer
    /// The connection's user expired or was removed from the users file.
    case revoked
    /// The TLS handshake with the client failed (see igris_tls_handshake_failures_total).
    case tlsFailed

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
        case .deadPeer: return "dead_peer"
        case .revoked: return "account_revoked"
        case .tlsFailed: return "tls_failed"
        }
    }
}
