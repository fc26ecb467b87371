import Glibc
@_spi(Benchmarks) @testable import IgrisEngine

/// A backend whose completions the test writes: every operation the worker queues is
/// recorded, and nothing completes until the test says so (`complete`, `completeRecv`).
/// Modelled on swift-nio's SyscallAbstractionLayer: the worker's state machine runs for
/// real, without sockets moving bytes. Descriptors are real (unconnected) sockets, so the
/// few direct syscalls the worker makes (options, addresses) see valid descriptors.
final class ScriptedBackend: IOBackend {
    enum Operation: Equatable, CustomStringConvertible {
        case accept(Int32)
        case stopAccepting(Int32)
        case connect(Int32)
        case recv(Int32)
        case send(fd: Int32, buffer: UInt16, offset: Int, length: Int)
        case shutdownWrite(Int32)
        case pollReadable(Int32)
        case pollWritable(Int32)
        case spliceIn(socket: Int32, length: Int)
        case spliceOut(socket: Int32, length: Int)
        case close(fd: Int32, pending: [OperationKind], abort: Bool)

        var description: String {
            switch self {
            case .accept(let fd): return "accept(\(fd))"
            case .stopAccepting(let fd): return "stopAccepting(\(fd))"
            case .connect(let fd): return "connect(\(fd))"
            case .recv(let fd): return "recv(\(fd))"
            case .send(let fd, let b, let o, let l): return "send(\(fd), buffer \(b), \(o)+\(l))"
            case .shutdownWrite(let fd): return "shutdownWrite(\(fd))"
            case .pollReadable(let fd): return "pollReadable(\(fd))"
            case .pollWritable(let fd): return "pollWritable(\(fd))"
            case .spliceIn(let fd, let l): return "spliceIn(\(fd), \(l))"
            case .spliceOut(let fd, let l): return "spliceOut(\(fd), \(l))"
            case .close(let fd, let pending, let abort): return "close(\(fd), pending \(pending), abort \(abort))"
            }
        }
    }

    struct Submitted {
        var operation: Operation
        var token: OperationToken
    }

    let buffers: BufferPool
    var completionOverflows: UInt64 = 0
    var cancellations: UInt64 = 0
    /// Everything queued, oldest first; tests take what they look at.
    var submitted: [Submitted] = []
    private var ready: [Completion] = []
    /// What `peek` and `receiveNow` find on each descriptor.
    var input: [Int32: [UInt8]] = [:]
    /// What `sendNow` sent, per descriptor.
    var sentNow: [Int32: [UInt8]] = [:]

    init(bufferCount: Int = 4, bufferSize: Int = 4096) throws {
        buffers = try BufferPool(size: bufferSize, count: bufferCount)
    }

    private func record(_ operation: Operation, _ token: OperationToken) {
        submitted.append(Submitted(operation: operation, token: token))
    }

    func accept(listener fd: Int32, multishot: Bool, token: OperationToken) { record(.accept(fd), token) }
    func stopAccepting(listener fd: Int32, token: OperationToken) { record(.stopAccepting(fd), token) }
    func connect(fd: Int32, address: UnsafePointer<sockaddr>, length: socklen_t, token: OperationToken) { record(.connect(fd), token) }
    func recv(fd: Int32, limit: Int, reserve: Bool, token: OperationToken) {
        if reserve { reserveRecvs.insert(token.raw) }
        record(.recv(fd), token)
    }
    /// Recvs that take from the reserve (the kernel's other buffer group).
    var reserveRecvs: Set<UInt64> = []
    func send(fd: Int32, buffer: UInt16, offset: Int, length: Int, token: OperationToken) {
        record(.send(fd: fd, buffer: buffer, offset: offset, length: length), token)
    }
    var acceptBurst: Int { 64 }
    func shutdownWrite(fd: Int32, token: OperationToken) { record(.shutdownWrite(fd), token) }
    func pollReadable(fd: Int32, token: OperationToken) { record(.pollReadable(fd), token) }
    func pollWritable(fd: Int32, token: OperationToken) { record(.pollWritable(fd), token) }
    func spliceIn(socket: Int32, pipe: Int32, length: Int, token: OperationToken) { record(.spliceIn(socket: socket, length: length), token) }
    func spliceOut(pipe: Int32, socket: Int32, length: Int, token: OperationToken) { record(.spliceOut(socket: socket, length: length), token) }

    /// Closes the real descriptor; the close completes at once, the named pending
    /// operations do not (a test completes them, as the kernel would, -ECANCELED or late).
    func close(fd: Int32, pending: PendingOperations, abort: Bool, token: OperationToken) {
        let kinds = [pending.read, pending.write].filter { !$0.isNone }.map(\.kind)
        record(.close(fd: fd, pending: kinds, abort: abort), token)
        Glibc.close(fd)
        ready.append(Completion(token: token, result: 0))
    }

    func peek(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int {
        guard let bytes = input[fd], !bytes.isEmpty else { return -Int(EAGAIN) }
        let n = min(length, bytes.count)
        bytes.withUnsafeBytes { buffer.copyMemory(from: $0.baseAddress!, byteCount: n) }
        return n
    }

    func receiveNow(fd: Int32, into buffer: UnsafeMutableRawPointer, length: Int) -> Int {
        let n = peek(fd: fd, into: buffer, length: length)
        if n > 0 { input[fd]!.removeFirst(n) }
        return n
    }

    func sendNow(fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int {
        sentNow[fd, default: []] += Array(bytes)
        return bytes.count
    }

    func armDatagramReceive(fd: Int32, token: OperationToken) -> Bool { false }
    func datagram(_ buffer: UInt16, length: Int) -> ReceivedDatagram? { nil }
    func releaseDatagram(_ buffer: UInt16) {}

    /// No datagrams in these scripts.
    func receiveDatagrams(fd: Int32, into batch: DatagramBatch) -> Int { -Int(EAGAIN) }

    func sendDatagrams(fd: Int32, from batch: DatagramBatch, bytes: inout Int) -> Int { 0 }

    func shutdown(fd: Int32, how: Int32) -> Int32 { 0 }
    func consumeWake(fd: Int32) { Syscall.drainEventFD(fd) }
    func makeDirect(client: Int32, upstream: Int32) -> (client: Int32, upstream: Int32)? { nil }
    var directCapacity: Int { 0 }

    func releaseBuffer(_ id: UInt16) { buffers.returnToStack(id) }
    func adjustBuffers() { buffers.adjustTarget() }

    func waitForCompletions(timeoutNanoseconds: UInt64?) throws(SyscallError) {}

    var hasCompletions: Bool { !ready.isEmpty }

    func drainCompletions(_ body: (Completion) -> Void) {
        let batch = ready
        ready.removeAll()
        for c in batch { body(c) }
    }

    // MARK: - Scripting

    /// Completes `token` with `result` at the next turn.
    func complete(_ token: OperationToken, _ result: Int32, more: Bool = false) {
        ready.append(Completion(token: token, result: result, more: more))
    }

    /// Completes a recv with `bytes` in a pool buffer (as the kernel picks one), or
    /// -ENOBUFS when the pool is empty.
    func completeRecv(_ token: OperationToken, _ bytes: [UInt8]) {
        guard let id = reserveRecvs.remove(token.raw) != nil ? buffers.takeReserve() : buffers.take() else {
            ready.append(Completion(token: token, result: -ENOBUFS))
            return
        }
        bytes.withUnsafeBytes { buffers.pointer(id).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        buffers.markLent(id)
        ready.append(Completion(token: token, result: Int32(bytes.count), bufferID: id))
    }

    /// Removes and returns the queued operations matching `match` (oldest first).
    func take(_ match: (Operation) -> Bool) -> [Submitted] {
        let taken = submitted.filter { match($0.operation) }
        submitted.removeAll { match($0.operation) }
        return taken
    }

    /// The one queued send of `length` bytes to `fd` (from `offset`, when given) in whatever
    /// pool buffer, removed; nil when there is none or several.
    func takeSend(to fd: Int32, offset: Int? = nil, length: Int) -> Submitted? {
        takeOne { if case .send(fd, _, let o, length) = $0 { return offset == nil || o == offset } else { return false } }
    }

    /// The one queued operation matching `match`, removed; nil when there is none or several.
    func takeOne(_ match: (Operation) -> Bool) -> Submitted? {
        let taken = take(match)
        return taken.count == 1 ? taken[0] : nil
    }
}
