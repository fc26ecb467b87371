import CLinux
import Glibc

/// Slots for a batch of datagrams, received with one recvmmsg and sent with one sendmmsg
/// (`igris_dgram_*` in CLinux). Each slot holds a whole datagram (64 KiB) after `headroom`
/// bytes where a header can be written in front of it; only the pages a datagram touches
/// become resident. One per worker, made with its first UDP association.
public final class DatagramBatch {
    public let slots: Int
    public let headroom: Int
    private let batch: OpaquePointer

    /// `bufferSize`: bytes per slot after the headroom (0: a batch that only sends bytes the
    /// caller holds, `queue(_:length:to:)`).
    init?(slots: Int, headroom: Int, bufferSize: Int = 65536) {
        guard let b = igris_dgram_batch_create(UInt32(slots), bufferSize + headroom, headroom) else { return nil }
        batch = b
        self.slots = slots
        self.headroom = headroom
    }

    deinit { igris_dgram_batch_free(batch) }

    /// Datagrams received, or -errno.
    func receive(_ fd: Int32) -> Int {
        let n = igris_dgram_receive(fd, batch)
        return n < 0 ? -Int(igris_errno()) : Int(n)
    }

    /// Slot `i`'s buffer: the headroom, then the datagram.
    func slot(_ i: Int) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(igris_dgram_slot(batch, UInt32(i))) }

    func length(_ i: Int) -> Int { Int(igris_dgram_length(batch, UInt32(i))) }

    func truncated(_ i: Int) -> Bool { igris_dgram_truncated(batch, UInt32(i)) != 0 }

    func sender(_ i: Int) -> SocketAddress {
        var length = socklen_t(0)
        let sa = igris_dgram_sender(batch, UInt32(i), &length)!
        var storage = sockaddr_storage()
        withUnsafeMutableBytes(of: &storage) { $0.copyMemory(from: UnsafeRawBufferPointer(start: sa, count: Int(length))) }
        return SocketAddress(storage: storage, length: length)
    }

    /// Queues slot `i`'s bytes [offset, offset + length) for `to`.
    func queue(_ i: Int, offset: Int, length: Int, to address: SocketAddress) {
        address.withSockAddr { igris_dgram_queue(batch, UInt32(i), offset, length, $0, $1) }
    }

    /// Queues `length` bytes at `data` (kept by the caller until sent) for `to`.
    func queue(_ data: UnsafeMutableRawPointer, length: Int, to address: SocketAddress) {
        address.withSockAddr { igris_dgram_queue_bytes(batch, data, length, $0, $1) }
    }

    var queued: Int { Int(igris_dgram_queued(batch)) }

    /// Sends what is queued: how many went, or -errno.
    func send(_ fd: Int32, bytes: inout Int) -> Int {
        var sent = 0
        let n = igris_dgram_send(fd, batch, &sent)
        bytes = sent
        return n < 0 ? -Int(igris_errno()) : Int(n)
    }
}
