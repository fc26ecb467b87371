import ArgumentParser
import CLinux
import Glibc
import IgrisEngine

/// `igris-load echo` / `igris-load echo --sink`: a multi-threaded epoll server that echoes
/// (or discards) whatever it receives, so tests and benchmarks need no other program.
/// Prints `listening HOST:PORT` on stdout once ready.
struct EchoServer: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "echo", abstract: "Echo (or --sink: discard) server.")

    @Option(help: "Address to listen on (port 0: any free port).")
    var listen: String = "127.0.0.1:0"

    @Option(help: "Threads, each with its own SO_REUSEPORT socket.")
    var threads: Int = 1

    @Flag(help: "Discard what arrives instead of echoing it.")
    var sink = false

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let fds = try announcedSockets(listen, threads: threads, kind: .stream(nonBlocking: true))
        let sink = self.sink
        var threads: [pthread_t] = []
        for fd in fds {
            var t = pthread_t()
            let box = Unmanaged.passRetained(LoopBox(listener: fd, sink: sink)).toOpaque()
            pthread_create(&t, nil, { raw in
                let box = Unmanaged<LoopBox>.fromOpaque(raw!).takeRetainedValue()
                echoLoop(listener: box.listener, sink: box.sink)
                return nil
            }, box)
            threads.append(t)
        }
        for t in threads { pthread_join(t, nil) }
    }
}

/// What `announcedSockets` makes.
enum ServerSocketKind {
    case stream(nonBlocking: Bool)
    case datagram
}

/// One SO_REUSEPORT socket per thread on `listen` (port 0: the first picks one, the rest
/// join it), listening if a stream; then `listening HOST:PORT` on stdout, the ready signal
/// tests and benchmarks wait for.
func announcedSockets(_ listen: String, threads: Int, kind: ServerSocketKind) throws -> [Int32] {
    var bound: SocketAddress
    do { bound = try SocketAddress.resolve(listen, passive: true) } catch { throw ValidationError(error.description) }
    var fds: [Int32] = []
    for i in 0..<max(1, threads) {
        let fd: Int32
        switch kind {
        case .stream(let nonBlocking):
            fd = try Syscall.streamSocket(family: bound.family, nonBlocking: nonBlocking)
            try Syscall.setIntOption(fd, level: SOL_SOCKET, name: SO_REUSEADDR, value: 1, "SO_REUSEADDR")
        case .datagram:
            fd = Glibc.socket(bound.family, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        }
        try Syscall.setIntOption(fd, level: SOL_SOCKET, name: SO_REUSEPORT, value: 1, "SO_REUSEPORT")
        try Syscall.bind(fd, bound)
        if case .stream = kind { try Syscall.listen(fd, backlog: 4096) }
        if i == 0 { bound = try Syscall.localAddress(fd) }
        fds.append(fd)
    }
    var line = "listening \(bound)\n"
    line.withUTF8 { _ = write(1, $0.baseAddress, $0.count) }
    return fds
}

private final class LoopBox {
    let listener: Int32
    let sink: Bool
    init(listener: Int32, sink: Bool) { self.listener = listener; self.sink = sink }
}

/// Level-triggered epoll; a connection whose peer is slow to read keeps its unsent bytes
/// and stops reading until they are written (bounded: one buffer per connection).
private func echoLoop(listener: Int32, sink: Bool) {
    let ep = epoll_create1(Int32(EPOLL_CLOEXEC))
    var ev = epoll_event()
    ev.events = EPOLLIN.rawValue
    ev.data.u64 = UInt64(UInt32(bitPattern: listener))
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev)
    let size = 256 * 1024
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 16)
    // fd -> pending bytes not yet echoed
    var pending: [Int32: [UInt8]] = [:]
    let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: 256)
    while true {
        let n = epoll_wait(ep, events, 256, -1)
        if n < 0 { if errno == EINTR { continue }; return }
        for k in 0..<Int(n) {
            let fd = Int32(truncatingIfNeeded: events[k].data.u64)
            if fd == listener {
                while case let c = Syscall.accept(listener), c >= 0 || c == -ECONNABORTED {
                    if c < 0 { continue }
                    _ = try? Syscall.setIntOption(c, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
                    var e = epoll_event()
                    e.events = EPOLLIN.rawValue | EPOLLRDHUP.rawValue
                    e.data.u64 = UInt64(UInt32(bitPattern: c))
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &e)
                }
                continue
            }
            if events[k].events & EPOLLOUT.rawValue != 0, var rest = pending[fd] {
                let w = rest.withUnsafeBytes { Syscall.send(fd, $0.baseAddress!, $0.count) }
                if w > 0 { rest.removeFirst(w) }
                if w < 0 && w != -Int(EAGAIN) { close(fd); pending[fd] = nil; continue }
                if rest.isEmpty {
                    pending[fd] = nil
                    var e = epoll_event()
                    e.events = EPOLLIN.rawValue | EPOLLRDHUP.rawValue
                    e.data.u64 = UInt64(UInt32(bitPattern: fd))
                    epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e)
                } else {
                    pending[fd] = rest
                }
                continue
            }
            guard pending[fd] == nil else { continue }
            let r = Syscall.recv(fd, buffer, size)
            if r == -Int(EAGAIN) { continue }
            if r <= 0 { close(fd); continue }
            if sink { continue }
            let w = Syscall.send(fd, buffer, r)
            if w == r { continue }
            if w < 0 && w != -Int(EAGAIN) { close(fd); continue }
            let sent = max(w, 0)
            pending[fd] = Array(UnsafeRawBufferPointer(start: buffer + sent, count: r - sent))
            var e = epoll_event()
            e.events = EPOLLOUT.rawValue | EPOLLRDHUP.rawValue
            e.data.u64 = UInt64(UInt32(bitPattern: fd))
            epoll_ctl(ep, EPOLL_CTL_MOD, fd, &e)
        }
    }
}
