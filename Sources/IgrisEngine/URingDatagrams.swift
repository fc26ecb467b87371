import CURing
import Glibc

/// The io_uring backend's datagram receive: a multishot recvmsg per UDP socket, taking each
/// datagram into a buffer of a provided-buffer ring of its own (group 2; the pool's buffers
/// stay the TCP bridges'). A buffer holds `io_uring_recvmsg_out`, the sender and the payload;
/// the worker hands it back as soon as the datagram is relayed. Made with the first UDP
/// association: a gateway without one never maps it.
final class URingDatagramRing {
    static let group: UInt16 = 2
    /// Buffers in the ring: what a burst may take before the multishot receive stops
    /// (ENOBUFS) and is re-armed, once the worker has relayed and returned them.
    static let count = 64
    /// A whole datagram after the header and sender.
    static let bufferSize = 65536 + 256

    private let ringMemory: UnsafeMutableRawPointer
    private let ringBytes: Int
    private let storage: UnsafeMutableRawPointer
    /// The template every multishot recvmsg of this ring uses (the kernel reads its
    /// namelen/controllen for each datagram, so it outlives every operation).
    let message: UnsafeMutablePointer<msghdr>

    init?(ring: UnsafeMutablePointer<io_uring>) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        ringBytes = (Self.count * igris_buf_ring_entry_size() + page - 1) / page * page
        guard let mem = mmap(nil, ringBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              mem != UnsafeMutableRawPointer(bitPattern: -1) else { return nil }
        // Only the pages datagrams touch become resident.
        guard let buffers = mmap(nil, Self.count * Self.bufferSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              buffers != UnsafeMutableRawPointer(bitPattern: -1) else {
            munmap(mem, ringBytes)
            return nil
        }
        guard igris_uring_register_buf_ring(ring, mem, UInt32(Self.count), Self.group) == 0 else {
            munmap(mem, ringBytes)
            munmap(buffers, Self.count * Self.bufferSize)
            return nil
        }
        ringMemory = mem
        storage = buffers
        message = .allocate(capacity: 1)
        message.initialize(to: msghdr())
        message.pointee.msg_namelen = socklen_t(MemoryLayout<sockaddr_storage>.size)
        for id in 0..<Self.count { release(UInt16(id)) }
    }

    deinit {
        munmap(ringMemory, ringBytes)
        munmap(storage, Self.count * Self.bufferSize)
        message.deallocate()
    }

    func pointer(_ id: UInt16) -> UnsafeMutableRawPointer { storage + Int(id) * Self.bufferSize }

    /// Back into the ring for the next datagram.
    func release(_ id: UInt16) {
        igris_buf_ring_recycle(ringMemory, UInt32(Self.count), pointer(id), UInt32(Self.bufferSize), id)
    }

    func arm(_ sqe: UnsafeMutablePointer<io_uring_sqe>, fd: Int32) {
        igris_prep_recvmsg_multishot(sqe, fd, message, Self.group)
    }

    /// The datagram in buffer `id` (`length` bytes as completed).
    func datagram(_ id: UInt16, length: Int) -> ReceivedDatagram? {
        let base = pointer(id)
        var nameOffset: UInt32 = 0, nameLength: UInt32 = 0, payloadOffset: UInt32 = 0, payloadLength: UInt32 = 0
        var truncated: Int32 = 0
        guard igris_recvmsg_parse(base, Int32(length), message, &nameOffset, &nameLength, &payloadOffset, &payloadLength, &truncated) == 0,
              nameLength <= UInt32(MemoryLayout<sockaddr_storage>.size) else { return nil }
        var sender = sockaddr_storage()
        withUnsafeMutableBytes(of: &sender) { $0.copyMemory(from: UnsafeRawBufferPointer(start: base + Int(nameOffset), count: Int(nameLength))) }
        // Everything before the payload (the header, the sender, now copied) may be written over.
        return ReceivedDatagram(payload: base + Int(payloadOffset), count: Int(payloadLength), headroom: Int(payloadOffset),
                                sender: SocketAddress(storage: sender, length: socklen_t(nameLength)), truncated: truncated != 0)
    }
}

/// A datagram a backend delivered in a buffer of its own (`IOBackend.datagram`).
public struct ReceivedDatagram {
    public var payload: UnsafeMutableRawPointer
    public var count: Int
    /// Bytes before `payload` that may be written over (room for a header).
    public var headroom: Int
    public var sender: SocketAddress
    public var truncated: Bool
}
