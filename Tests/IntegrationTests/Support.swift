import CSodium
import Dispatch
import Foundation
import Glibc
import IgrisPolicy
import IgrisEngine
import Synchronization
import Testing

/// The backends every engine test runs against (same body for both).
let engineBackends: [BackendChoice] = [.ioUring, .epoll]

/// Splice settings the data-path tests run under: copy only, and splice from the first byte.
let spliceModes: [SpliceMode] = [.never, .always]

/// A failure inside a test helper, with enough context to read in the log.
struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A blocking loopback TCP socket for the test side of a bridge.
final class TestSocket: @unchecked Sendable {
    let fd: Int32

    init(fd: Int32) { self.fd = fd }

    /// `receiveBuffer`: SO_RCVBUF, set before connecting (fixes the window, no autotuning).
    /// `from`: the local address to connect from (another loopback address is another source).
    static func connect(_ address: SocketAddress, receiveBuffer: Int32? = nil, from source: SocketAddress? = nil) throws -> TestSocket {
        let fd = try Syscall.streamSocket(family: address.family, nonBlocking: false)
        if var size = receiveBuffer { setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size)) }
        if let source, source.withSockAddr({ Glibc.bind(fd, $0, $1) }) != 0 {
            let e = errno
            Glibc.close(fd)
            throw SyscallError("bind", errno: e)
        }
        let rc = address.withSockAddr { Glibc.connect(fd, $0, $1) }
        if rc != 0 {
            let e = errno
            Glibc.close(fd)
            throw SyscallError("connect", errno: e)
        }
        return TestSocket(fd: fd)
    }

    /// Bounds every blocking read so a broken bridge fails the test instead of hanging it.
    func setReceiveTimeout(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    func setSendTimeout(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    @discardableResult
    func write(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = Syscall.send(fd, bytes.baseAddress! + off, bytes.count - off)
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    @discardableResult
    func write(_ bytes: [UInt8]) -> Bool { bytes.withUnsafeBytes { write($0) } }

    /// One recv: bytes (0 = EOF) or -errno.
    func read(into buffer: UnsafeMutableRawBufferPointer) -> Int {
        Syscall.recv(fd, buffer.baseAddress!, buffer.count)
    }

    /// One recv of at most one byte: 1, 0 (EOF) or -errno; what a test waits on to see the
    /// gateway close the connection.
    func readOneByte() -> Int {
        var byte: UInt8 = 0
        return Syscall.recv(fd, &byte, 1)
    }

    func readExactly(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        var off = 0
        while off < count {
            let n = out.withUnsafeMutableBytes { Syscall.recv(fd, $0.baseAddress! + off, count - off) }
            if n == 0 { throw TestFailure("EOF after \(off) of \(count) bytes") }
            if n < 0 { throw TestFailure("read failed after \(off) of \(count) bytes: \(Errno.describe(Int32(-n)))") }
            off += n
        }
        return out
    }

    func shutdownWrite() { _ = Glibc.shutdown(fd, Int32(SHUT_WR)) }

    /// Close with RST (SO_LINGER 0).
    func reset() {
        Syscall.setLingerZero(fd)
        Glibc.close(fd)
    }

    func close() { Glibc.close(fd) }
}

/// A loopback listener whose accepted connections each run `handler` on a thread of their own.
final class TestUpstream: @unchecked Sendable {
    let fd: Int32
    let address: SocketAddress
    private let acceptThread: TestThread
    let accepted = SharedCounter()

    init(_ handler: @escaping @Sendable (TestSocket) -> Void) throws {
        (fd, address) = try listeningSocket("127.0.0.1:0", backlog: 1024)
        let listener = fd
        let counter = accepted
        acceptThread = TestThread {
            while true {
                let c = Glibc.accept(listener, nil, nil)
                if c < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return  // listener shut down
                }
                counter.add(1)
                let socket = TestSocket(fd: c)
                socket.setReceiveTimeout(seconds: 30)
                // An echo written in two pieces would otherwise wait out a delayed ACK.
                _ = try? Syscall.setIntOption(c, level: Int32(IPPROTO_TCP), name: TCP_NODELAY, value: 1, "TCP_NODELAY")
                TestThread.detach { handler(socket) }
            }
        }
    }

    func stop() {
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
        acceptThread.join()
        Glibc.close(fd)
    }
}

/// A counter shared between test threads.
final class SharedCounter: Sendable {
    private let cell = Atomic<Int>(0)
    func add(_ n: Int) { cell.wrappingAdd(n, ordering: .relaxed) }
    var value: Int { cell.load(ordering: .relaxed) }
}

/// A value written by one thread and read by another after a join/barrier (tests only).
/// The value lives inside the lock: a separate zero-sized `Locked<Void>` made ThreadSanitizer
/// report the lock's own object header as raced (its Void "value" sits at the same address).
final class SharedBox<T>: @unchecked Sendable {
    private let storage: Locked<T>
    init(_ v: T) { storage = Locked(v) }
    var value: T {
        get { storage.withLock { $0 } }
        set { storage.withLock { $0 = newValue } }
    }

    /// Read-modify-write under one lock hold (two threads finishing at once both count).
    func update(_ body: (inout T) -> Void) {
        storage.withLock { body(&$0) }
    }
}

/// A joinable pthread (Dispatch's pool is too small for many blocking sockets at once).
final class TestThread: @unchecked Sendable {
    private var thread = pthread_t()
    private final class Body {
        let run: () -> Void
        init(_ r: @escaping () -> Void) { run = r }
    }

    init(_ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Body(body)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            Unmanaged<Body>.fromOpaque(raw!).takeRetainedValue().run()
            return nil
        }, box)
        precondition(rc == 0)
    }

    func join() { pthread_join(thread, nil) }

    static func detach(_ body: @escaping @Sendable () -> Void) {
        let t = TestThread(body)
        pthread_detach(t.thread)
    }
}

/// The gateway under test, in process: one forward from 127.0.0.1:<free port> to `upstream`.
final class Gateway: @unchecked Sendable {
    let server: Server
    var address: SocketAddress { server.listenAddresses[0] }

    init(backend: BackendChoice, splice: SpliceMode = .auto, upstream: SocketAddress, workers: Int = 2,
         configure: (inout ServerConfiguration) -> Void = { _ in }) throws {
        var configuration = ServerConfiguration(
            forwards: [ForwardRule(listen: try SocketAddress.resolve("127.0.0.1:0"), upstream: upstream)],
            workers: workers, backend: backend)
        configuration.splice = splice
        configure(&configuration)
        server = try Server(configuration: configuration)
        try server.start()
    }

    /// Stops the gateway (drain with nothing left open) and waits for its threads.
    func stop() {
        server.beginDrain()
        server.wait()
    }

    /// Waits (bounded) until `condition` holds; returns whether it did.
    func eventually(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
        IntegrationTests.eventually(seconds: seconds, condition)
    }

    var active: Int64 { server.total(.activeConnections) }
}

/// Deterministic pseudo-random bytes (xorshift64*), so both ends can produce the same stream.
struct PatternStream {
    private var state: UInt64

    init(seed: UInt64) { state = seed &* 0x9E37_79B9_7F4A_7C15 | 1 }

    mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        let words = buffer.count / 8
        let p = buffer.baseAddress!.assumingMemoryBound(to: UInt64.self)
        for i in 0..<words {
            state ^= state >> 12
            state ^= state << 25
            state ^= state >> 27
            p[i] = state &* 0x2545_F491_4F6C_DD1D
        }
        for i in (words * 8)..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: state >> (i % 8 * 8)) }
    }
}

/// Incremental SHA-256 (libsodium).
struct SHA256 {
    private var state = crypto_hash_sha256_state()

    init() { crypto_hash_sha256_init(&state) }

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        crypto_hash_sha256_update(&state, bytes.baseAddress!.assumingMemoryBound(to: UInt8.self), UInt64(bytes.count))
    }

    mutating func finish() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        crypto_hash_sha256_final(&state, &out)
        return out
    }
}

/// Sends `count` pattern bytes from `seed` and returns their SHA-256.
/// `midway`: after `at` bytes (a multiple of `chunk`), call `wait` once before going on.
func sendPattern(_ socket: TestSocket, seed: UInt64, count: Int, chunk: Int = 256 * 1024,
                 midway: (at: Int, wait: () -> Void)? = nil) -> (sent: Int, digest: [UInt8]) {
    var stream = PatternStream(seed: seed)
    var hash = SHA256()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
    defer { buffer.deallocate() }
    var sent = 0
    while sent < count {
        let n = min(chunk, count - sent)
        let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
        stream.fill(part)
        hash.update(UnsafeRawBufferPointer(part))
        if !socket.write(UnsafeRawBufferPointer(part)) { break }
        sent += n
        if let midway, sent == midway.at { midway.wait() }
    }
    return (sent, hash.finish())
}

/// Reads to EOF, hashing; returns byte count and SHA-256 (or the error that ended it).
func receiveDigest(_ socket: TestSocket) -> (received: Int, digest: [UInt8], error: Int32?) {
    var hash = SHA256()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
    defer { buffer.deallocate() }
    var received = 0
    while true {
        let n = socket.read(into: buffer)
        if n == 0 { return (received, hash.finish(), nil) }
        if n < 0 { return (received, hash.finish(), Int32(-n)) }
        hash.update(UnsafeRawBufferPointer(rebasing: buffer[0..<n]))
        received += n
    }
}

/// SHA-256 of the first `count` bytes of pattern `seed`.
func patternDigest(seed: UInt64, count: Int) -> [UInt8] {
    var stream = PatternStream(seed: seed)
    var hash = SHA256()
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 256 * 1024, alignment: 16)
    defer { buffer.deallocate() }
    var done = 0
    while done < count {
        let n = min(buffer.count, count - done)
        let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
        stream.fill(part)
        hash.update(UnsafeRawBufferPointer(part))
        done += n
    }
    return hash.finish()
}

/// Where the package's executables were built (next to this test bundle).
func productPath(_ name: String) -> String {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
    // swift test runs <build>/debug/<package>PackageTests.xctest
    if dir.lastPathComponent.hasSuffix(".xctest") { dir = dir.deletingLastPathComponent() }
    return dir.appendingPathComponent(name).path
}

/// A child process with captured stdout/stderr.
final class ChildProcess: @unchecked Sendable {
    let process = Process()
    let stdout = Pipe()
    let stderr = Pipe()

    init(_ path: String, _ arguments: [String], environment: [String: String] = [:]) throws {
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        process.standardOutput = stdout
        process.standardError = stderr
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    /// First line of stdout (e.g. igris-load's "listening HOST:PORT").
    func readLine() -> String {
        var bytes: [UInt8] = []
        let fd = stdout.fileHandleForReading.fileDescriptor
        var c: UInt8 = 0
        while Glibc.read(fd, &c, 1) == 1 && c != 10 { bytes.append(c) }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Waits for exit (bounded); returns status and stderr.
    func finish(timeout: Double = 20) -> (status: Int32, stderr: String) {
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(5000) }
        if process.isRunning { process.interrupt(); kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        let err = String(decoding: stderr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        return (process.terminationStatus, err)
    }

    func signal(_ s: Int32) { kill(process.processIdentifier, s) }

    func terminate() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
    }
}

extension ChildProcess {
    /// Waits (bounded) for exit without reading its pipes to their end (a successor it
    /// started may hold them open): the exit status, or nil if it still runs. Foundation
    /// reaps a child only once its pipes close, so it is reaped here if need be.
    func waitForExit(seconds: Double = 10) -> Int32? {
        let pid = process.processIdentifier
        var result: Int32? = nil
        _ = eventually(seconds: seconds) {
            if !process.isRunning {
                result = process.terminationStatus
                return true
            }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid {
                result = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
                return true
            }
            return false
        }
        return result
    }
}

/// Runs a command to completion and returns its exit status and stderr.
func runCommand(_ path: String, _ arguments: [String], timeout: Double = 20) throws -> (status: Int32, stderr: String) {
    try ChildProcess(path, arguments).finish(timeout: timeout)
}

/// A free loopback port (bound then released; nothing listens on it afterwards).
func unusedPort() throws -> UInt16 {
    let fd = try Syscall.streamSocket(family: AF_INET, nonBlocking: false)
    defer { Glibc.close(fd) }
    try Syscall.bind(fd, try SocketAddress.resolve("127.0.0.1:0"))
    return try Syscall.localAddress(fd).port
}

/// An in-process upstream that echoes every connection until EOF.
func echoUpstream() throws -> TestUpstream {
    try TestUpstream { echo($0) }
}

/// An upstream that reads each request to EOF, then answers `count` pattern bytes (`seed`).
func answeringUpstream(seed: UInt64, count: Int) throws -> TestUpstream {
    try TestUpstream { socket in
        _ = receiveDigest(socket)
        _ = sendPattern(socket, seed: seed, count: count)
        socket.close()
    }
}

/// Echoes what arrives until EOF, then closes.
func echo(_ socket: TestSocket) {
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = buffer.withUnsafeMutableBytes { socket.read(into: $0) }
        if n <= 0 { break }
        socket.write(Array(buffer[0..<n]))
    }
    socket.close()
}

/// Waits (bounded, 10 s) until `condition` holds; returns whether it did.
func eventually(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if condition() { return true }
        usleep(2000)
    }
    return condition()
}

/// Waits (bounded) until something accepts on `address` — a child process has started.
func waitUntilAccepting(_ address: String) -> Bool {
    eventually {
        guard let s = try? TestSocket.connect(try SocketAddress.resolve(address)) else { return false }
        s.close()
        return true
    }
}

/// A plain listening socket on `address` (port 0: any free one): its fd and bound address.
/// The caller closes the fd.
func listeningSocket(_ address: String, backlog: Int32) throws -> (fd: Int32, address: SocketAddress) {
    let wanted = try SocketAddress.resolve(address)
    let fd = try Syscall.streamSocket(family: wanted.family, nonBlocking: false)
    do {
        try Syscall.bind(fd, wanted)
        try Syscall.listen(fd, backlog: backlog)
        return (fd, try Syscall.localAddress(fd))
    } catch {
        Glibc.close(fd)
        throw error
    }
}

/// Collects a child's stderr lines as they come.
final class LogLines: @unchecked Sendable {
    let lines = SharedBox<[String]>([])
    init(_ child: ChildProcess) {
        let fd = child.stderr.fileHandleForReading.fileDescriptor
        let box = lines
        TestThread.detach {
            var current: [UInt8] = []
            var byte: UInt8 = 0
            while Glibc.read(fd, &byte, 1) == 1 {
                if byte == 10 {
                    let line = String(decoding: current, as: UTF8.self)
                    box.update { $0.append(line) }
                    current.removeAll()
                } else {
                    current.append(byte)
                }
            }
        }
    }

    /// Waits (bounded, 10 s) until `count` lines contain `text`.
    func wait(for text: String, count: Int = 1) -> Bool {
        for _ in 0..<1000 {
            if lines.value.filter({ $0.contains(text) }).count >= count { return true }
            usleep(10_000)
        }
        return false
    }
}
