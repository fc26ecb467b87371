import ArgumentParser
import Glibc
import IgrisEngine
import Synchronization

/// `igris-load http-origin`: answers every request with a fixed 200 response of `--size`
/// bytes, then closes (one request per connection, as a proxy forwarding with
/// `Connection: close` asks). Prints `listening HOST:PORT` once ready.
struct HTTPOrigin: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "http-origin", abstract: "Minimal HTTP/1.1 origin server.")

    @Option(help: "Address to listen on (port 0: any free port).")
    var listen: String = "127.0.0.1:0"

    @Option(help: "Threads, each with its own SO_REUSEPORT socket.")
    var threads: Int = 2

    @Option(help: "Response body bytes.")
    var size: Int = 1024

    func run() throws {
        signal(SIGPIPE, SIG_IGN)
        let fds = try announcedSockets(listen, threads: threads, kind: .stream(nonBlocking: false))
        let response = Array("HTTP/1.1 200 OK\r\nContent-Length: \(size)\r\nConnection: close\r\n\r\n".utf8) + [UInt8](repeating: 0x61, count: size)
        let threads = fds.map { listener in
            WorkerThread.spawn(name: "http-origin") {
                var buffer = [UInt8](repeating: 0, count: 16384)
                while true {
                    let c = Glibc.accept(listener, nil, nil)
                    if c < 0 { continue }
                    var head: [UInt8] = []
                    while !(head.count >= 4 && Array(head.suffix(4)) == [13, 10, 13, 10]) && head.count < 65536 {
                        let n = recv(c, &buffer, buffer.count, 0)
                        if n <= 0 { break }
                        head += buffer[0..<n]
                    }
                    _ = response.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    Glibc.close(c)
                }
            }
        }
        for t in threads { pthread_join(t, nil) }
    }
}

/// `igris-load http`: GET requests through an HTTP proxy (absolute form; `--direct`: origin
/// form straight to the origin), one per connection, from `--threads` threads; prints
/// requests per second and failures.
struct HTTPClients: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "http", abstract: "Plain HTTP requests through an HTTP proxy.")

    @Option(help: "The HTTP proxy, HOST:PORT.")
    var proxy: String?

    @Flag(help: "Request from the origin directly (the reference).")
    var direct = false

    @Option(help: "The origin, HOST:PORT.")
    var target: String

    @Option(help: "Threads, one request at a time each.")
    var threads: Int = 4

    @Option(help: "Seconds to run.")
    var seconds: Double = 5

    func run() throws {
        let target = try resolveTarget(self.target)
        let proxy = try self.proxy.map(resolveTarget)
        guard direct || proxy != nil else { throw ValidationError("give --proxy HOST:PORT or --direct") }
        let request = Array((proxy == nil ? "GET /x HTTP/1.1\r\nHost: \(target)\r\n\r\n"
                                          : "GET http://\(target)/x HTTP/1.1\r\nHost: \(target)\r\nProxy-Connection: close\r\n\r\n").utf8)
        let ok = Atomic<Int>(0)
        let failed = Atomic<Int>(0)
        let deadline = Syscall.monotonicNanoseconds() + UInt64(seconds * 1e9)
        let threads = (0..<max(1, threads)).map { _ in
            WorkerThread.spawn(name: "http-client") {
                var buffer = [UInt8](repeating: 0, count: 65536)
                while Syscall.monotonicNanoseconds() < deadline {
                    guard let c = try? ClientSocket(proxy ?? target) else { failed.wrappingAdd(1, ordering: .relaxed); continue }
                    var response: [UInt8] = []
                    if request.withUnsafeBytes({ c.writeAll($0.baseAddress!, $0.count) }) {
                        while true {
                            let n = recv(c.fd, &buffer, buffer.count, 0)
                            if n <= 0 { break }
                            if response.count < 16 { response += buffer[0..<min(n, 16)] }
                        }
                    }
                    c.close()
                    if response.starts(with: Array("HTTP/1.1 200".utf8)) { ok.wrappingAdd(1, ordering: .relaxed) } else { failed.wrappingAdd(1, ordering: .relaxed) }
                }
            }
        }
        for t in threads { pthread_join(t, nil) }
        let n = ok.load(ordering: .relaxed)
        printTable([("requests_per_s", String(Int(Double(n) / seconds))), ("ok", String(n)), ("failed", String(failed.load(ordering: .relaxed)))])
    }
}
