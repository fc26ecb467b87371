import Glibc
import IgrisEngine
import IgrisPolicy
import IgrisProtocols
import IgrisTLS
import Synchronization

/// The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process answers),
/// `/readyz` (503 once draining, so a balancer stops sending new clients). Control plane,
/// not data plane: a thread of its own with blocking sockets, at most 64 requests at once and
/// 8 from one source address, each with 5 s to send its whole head (at most 8 KiB) — TLS
/// handshake included when the listener has `tls:`.
public final class AdminServer: Sendable {
    public let address: SocketAddress
    private let listener: Int32
    /// Signalled by `stop()`: the accept thread closes the listener and returns.
    private let stopFD: Int32
    private let stopped = Atomic<Bool>(false)
    private let metrics: MetricsRenderer
    private let inFlight = Atomic<Int>(0)
    private let servedCount = Atomic<Int64>(0)
    /// Requests answered at once, all sources together, and from one source address: a few
    /// slow or hostile clients can't hold /healthz shut for a balancer's checks.
    public static let maxConcurrentRequests = 64
    public static let maxConcurrentPerSource = 8
    /// The whole request head must arrive within this, however slowly it drips.
    public static let headDeadlineNanoseconds: UInt64 = 5_000_000_000
    private let perSource = Locked<[String: Int]>([:])
    /// HTTPS instead of HTTP (`tls:` on the admin listener).
    private let tls: TLSServerContext?

    /// Binds `listen`, or adopts the socket a predecessor handed over for that address. The
    /// listener is non-blocking (it may be shared with a predecessor or successor while a
    /// hand-off runs): the accept thread polls it.
    public init(listen: SocketAddress, metrics: MetricsRenderer, inherited: InheritedSockets? = nil, tls: TLSServerContext? = nil) throws(ServerError) {
        self.metrics = metrics
        self.tls = tls
        do throws(SyscallError) {
            let fd: Int32
            if let handed = inherited?.take(.admin, address: listen.description).first {
                fd = handed
            } else {
                fd = try Syscall.streamSocket(family: listen.family, nonBlocking: true)
                do {
                    try Syscall.setIntOption(fd, level: SOL_SOCKET, name: SO_REUSEADDR, value: 1, "SO_REUSEADDR")
                    try Syscall.bind(fd, listen)
                    try Syscall.listen(fd, backlog: 64)
                } catch {
                    Syscall.close(fd)
                    throw error
                }
            }
            do {
                address = try Syscall.localAddress(fd)
                stopFD = try Syscall.eventfd()
            } catch {
                Syscall.close(fd)
                throw error
            }
            listener = fd
        } catch {
            throw .listen(listen.description, error)
        }
    }

    /// The listening socket, for a successor (`ListenerHandoff`); valid until `stop()`.
    public var socket: Int32 { listener }

    public func start() {
        let fd = listener
        let stopFD = stopFD
        AdminThread.detach { [self] in
            // One descriptor held in reserve (a duplicate of the listener): when the data plane
            // has taken every other one — exactly when an operator wants /metrics — it is given
            // up to accept one scrape, which is served here; then dup2 turns the connection's
            // number back into the reserve without ever freeing it, so a worker can't take it.
            var reserve = fcntl(fd, F_DUPFD_CLOEXEC, 0)
            while true {
                if reserve < 0 { reserve = fcntl(fd, F_DUPFD_CLOEXEC, 0) }
                var polled = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
                _ = poll(&polled, 2, -1)
                if polled[1].revents != 0 {
                    // stop(): closed here, by the only thread using it, so its number can't be
                    // reused under a pending accept. A successor may still hold the socket.
                    Syscall.close(fd)
                    if reserve >= 0 { Syscall.close(reserve) }
                    Syscall.close(stopFD)
                    return
                }
                var c = Syscall.accept(fd, nonBlocking: false)
                if (c == -EMFILE || c == -ENFILE) && reserve >= 0 {
                    Syscall.close(reserve)
                    reserve = -1
                    c = Syscall.accept(fd, nonBlocking: false)
                    if c >= 0 {
                        serve(c)
                        if Glibc.dup2(fd, c) == c {
                            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
                            reserve = c
                        } else {
                            Syscall.close(c)
                        }
                        continue
                    }
                }
                if c == -ECONNABORTED || c == -EAGAIN { continue }
                if c == -EMFILE || c == -ENFILE {
                    usleep(100_000)  // the reserve was taken meanwhile: the data plane comes first
                    continue
                }
                if c < 0 { continue }  // taken by another process sharing the socket, or a transient error
                let source = (try? Syscall.peerAddress(c))?.ipAddress.description ?? "-"
                let admitted = perSource.withLock { counts -> Bool in
                    guard counts[source, default: 0] < Self.maxConcurrentPerSource else { return false }
                    counts[source, default: 0] += 1
                    return true
                }
                guard admitted else {
                    Syscall.close(c)
                    continue
                }
                if inFlight.wrappingAdd(1, ordering: .relaxed).newValue > Self.maxConcurrentRequests {
                    inFlight.wrappingSubtract(1, ordering: .relaxed)
                    release(source)
                    Syscall.close(c)
                    continue
                }
                let connection = c
                AdminThread.detach { [self] in
                    serve(connection)
                    Syscall.close(connection)
                    inFlight.wrappingSubtract(1, ordering: .relaxed)
                    release(source)
                }
            }
        }
    }

    /// Stops accepting (requests being answered finish on their own threads). The socket
    /// itself closes with its last descriptor: a successor it was handed to keeps it.
    public func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        Syscall.signalEventFD(stopFD)
    }

    public var requestsServed: Int64 { servedCount.load(ordering: .relaxed) }

    private func release(_ source: String) {
        perSource.withLock { counts in
            let left = counts[source, default: 1] - 1
            counts[source] = left > 0 ? left : nil
        }
    }

    /// One request on connection `c`: plain, or through a TLS stream (handshake first).
    private func serve(_ c: Int32) {
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let deadline = Syscall.monotonicNanoseconds() + Self.headDeadlineNanoseconds
        // The deadline is for the whole head: each read may only wait for what is left.
        func waitNoLongerThanDeadline() -> Bool {
            let now = Syscall.monotonicNanoseconds()
            guard now < deadline else { return false }
            let left = deadline - now
            var wait = timeval(tv_sec: Int(left / 1_000_000_000), tv_usec: max(1, Int(left % 1_000_000_000 / 1000)))
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &wait, socklen_t(MemoryLayout<timeval>.size))
            return true
        }
        guard let tls else {
            serve(c, receive: { p, n in waitNoLongerThanDeadline() ? Syscall.recv(c, p, n) : -1 },
                  send: { p, n in Syscall.send(c, p, n) })
            return
        }
        guard waitNoLongerThanDeadline(), let session = tls.makeSession(), let stream = try? BlockingTLSStream(fd: c, session: session) else { return }
        serve(c, receive: { p, n in waitNoLongerThanDeadline() ? stream.read(into: p, capacity: n) : -1 },
              send: { p, n in stream.write(p, count: n) ? n : -1 })
        stream.finish()
    }

    private func serve(_ c: Int32, receive: (UnsafeMutableRawPointer, Int) -> Int, send: (UnsafeRawPointer, Int) -> Int) {
        var parser = HTTPHeadParser(limit: 8192)
        var buffer = [UInt8](repeating: 0, count: 4096)
        var head: HTTPRequestHead? = nil
        reading: while true {
            let n = buffer.withUnsafeMutableBytes { receive($0.baseAddress!, $0.count) }
            if n <= 0 { return }  // gone, or too slow
            let (_, event) = buffer.withUnsafeBytes { parser.feed(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            switch event {
            case .needMore: continue
            case .head(let h): head = h; break reading
            case .failure: respond(send, 400, "Bad Request", "bad request\n"); return
            }
        }
        guard let head else { return }
        servedCount.wrappingAdd(1, ordering: .relaxed)
        guard head.method == "GET" || head.method == "HEAD" else {
            respond(send, 405, "Method Not Allowed", "only GET\n", extra: "Allow: GET, HEAD\r\n")
            return
        }
        let path = head.target.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.target
        let bodyless = head.method == "HEAD"
        switch path {
        case "/metrics":
            respond(send, 200, "OK", metrics.render(), type: "text/plain; version=0.0.4; charset=utf-8", bodyless: bodyless)
        case "/healthz":
            // Alive either way; the body says what an operator needs to know.
            let body = metrics.server.isAcceptingPaused ? "ok; accepting paused: out of descriptors or memory\n" : "ok\n"
            respond(send, 200, "OK", body, bodyless: bodyless)
        case "/readyz":
            if metrics.server.isDraining {
                respond(send, 503, "Service Unavailable", "draining\n", bodyless: bodyless)
            } else if metrics.server.isAcceptingPaused {
                respond(send, 503, "Service Unavailable", "accepting paused: out of descriptors or memory\n", bodyless: bodyless)
            } else {
                respond(send, 200, "OK", "ready\n", bodyless: bodyless)
            }
        default:
            respond(send, 404, "Not Found", "not found (try /metrics, /healthz, /readyz)\n", bodyless: bodyless)
        }
    }

    private func respond(_ send: (UnsafeRawPointer, Int) -> Int, _ status: Int, _ reason: String, _ body: String, type: String = "text/plain; charset=utf-8",
                         extra: String = "", bodyless: Bool = false) {
        let bodyBytes = Array(body.utf8)
        var response = Array("HTTP/1.1 \(status) \(reason)\r\nContent-Type: \(type)\r\nContent-Length: \(bodyBytes.count)\r\n\(extra)Connection: close\r\n\r\n".utf8)
        if !bodyless { response += bodyBytes }
        var offset = 0
        while offset < response.count {
            let n = response.withUnsafeBytes { send($0.baseAddress! + offset, $0.count - offset) }
            if n <= 0 { return }
            offset += n
        }
    }
}

enum AdminThread {
    static func detach(_ body: @escaping @Sendable () -> Void) {
        final class Box { let run: @Sendable () -> Void; init(_ r: @escaping @Sendable () -> Void) { run = r } }
        var t = pthread_t()
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        let rc = pthread_create(&t, nil, { raw in Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().run(); return nil }, box)
        if rc == 0 { pthread_detach(t) } else { Unmanaged<Box>.fromOpaque(box).release() }
    }
}
