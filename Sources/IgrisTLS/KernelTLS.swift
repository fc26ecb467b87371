import Glibc
import COpenSSL

/// Kernel TLS (kTLS): after a TLS 1.3 handshake, the negotiated keys go to the kernel
/// (`setsockopt(SOL_TLS, TLS_TX / TLS_RX)`), which then encrypts and decrypts the socket's
/// records itself: plain recv/send and splice carry plaintext, and the session's OpenSSL state
/// can go. Needs the kernel's `tls` module (Kernel-notes); `probe` says whether it is there.
public enum KernelTLS {
    public struct Support: Sendable {
        public var available: Bool
        public var reason: String
    }

    /// Whether the `tls` ULP attaches to an established TCP socket here (asked once).
    public static let support: Support = probe()

    /// Keys for one direction of a connection, as the kernel takes them.
    public struct Keys {
        /// TLS_CIPHER_* of linux/tls.h.
        public var cipher: Int32
        public var key: [UInt8]
        public var iv: [UInt8]
    }

    public enum Installation: Equatable {
        case installed
        /// Nothing changed (errno): the session goes on in user space.
        case unavailable(Int32)
        /// The transmit side went to the kernel, the receive side did not (errno): the socket
        /// is unusable and must be closed.
        case broken(Int32)
    }

    /// Hands both directions of `fd` to the kernel: `sent` records have gone out under the
    /// sending key, `received` came in under the receiving one.
    public static func install(fd: Int32, transmit: Keys, sent: UInt64, receive: Keys, received: UInt64) -> Installation {
        let rc = igris_ktls_attach(fd)
        if rc != 0 { return .unavailable(-rc) }
        let tx = transmit.key.withUnsafeBufferPointer { key in
            transmit.iv.withUnsafeBufferPointer { igris_ktls_install(fd, 1, transmit.cipher, key.baseAddress, key.count, $0.baseAddress, sent) }
        }
        if tx != 0 { return .unavailable(-tx) }
        let rx = receive.key.withUnsafeBufferPointer { key in
            receive.iv.withUnsafeBufferPointer { igris_ktls_install(fd, 0, receive.cipher, key.baseAddress, key.count, $0.baseAddress, received) }
        }
        return rx == 0 ? .installed : .broken(-rx)
    }

    /// Counts the whole TLS records at the start of `bytes`; nil when they end mid-record.
    public static func wholeRecords(_ bytes: UnsafeRawBufferPointer) -> Int? {
        var offset = 0, count = 0
        while offset < bytes.count {
            guard bytes.count - offset >= 5 else { return nil }
            let length = Int(bytes[offset + 3]) << 8 | Int(bytes[offset + 4])
            guard bytes.count - offset >= 5 + length else { return nil }
            offset += 5 + length
            count += 1
        }
        return count
    }

    private static func probe() -> Support {
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard listener >= 0 else { return Support(available: false, reason: "no socket") }
        defer { close(listener) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { a in
                bind(listener, a, length) == 0 && listen(listener, 1) == 0 && getsockname(listener, a, &length) == 0
            }
        }
        let client = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard bound, client >= 0 else { return Support(available: false, reason: "no loopback connection to try it on") }
        defer { close(client) }
        let connected = withUnsafePointer(to: &address) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(client, $0, length) == 0 }
        }
        guard connected else { return Support(available: false, reason: "loopback connect failed") }
        let server = accept(listener, nil, nil)
        if server >= 0 { close(server) }
        let rc = igris_ktls_attach(client)
        switch -rc {
        case 0: return Support(available: true, reason: "the tls ULP attaches: TLS 1.3 connections go to the kernel after their handshake")
        case ENOENT: return Support(available: false, reason: "TCP_ULP \"tls\": ENOENT: this kernel has no tls module (CONFIG_TLS; modprobe tls)")
        case ENOPROTOOPT: return Support(available: false, reason: "TCP_ULP: ENOPROTOOPT: kernel older than 4.13")
        default: return Support(available: false, reason: "TCP_ULP \"tls\": \(String(cString: strerror(-rc)))")
        }
    }
}

extension TLSSession {
    /// The kernel's keys for this session's records: `sending` (ours) or received. nil: not
    /// TLS 1.3, the context did not capture traffic secrets, or a cipher the kernel lacks.
    public func kernelKeys(sending: Bool) -> KernelTLS.Keys? {
        guard !protectsRecordsItself else { return nil }
        var key = [UInt8](repeating: 0, count: 32)
        var iv = [UInt8](repeating: 0, count: 12)
        var length = 0
        let cipher = igris_tls13_traffic_keys(ssl, sending ? 1 : 0, &key, &length, &iv)
        guard cipher >= 0 else { return nil }
        return KernelTLS.Keys(cipher: cipher, key: Array(key.prefix(length)), iv: iv)
    }

    /// Nothing is held inside OpenSSL: no partial record, no decrypted byte unread. Only then
    /// can the kernel take the receiving side over (it starts at the socket's next record).
    public var holdsNoInput: Bool { protectsRecordsItself ? !hasBufferedInput : SSL_has_pending(ssl) == 0 && bufferedCiphertext == 0 }

    /// The whole records in the output not yet taken, from byte `offset` of it.
    public func pendingRecords(from offset: Int) -> Int? {
        withPendingOutput { out in
            offset <= out.count ? KernelTLS.wholeRecords(UnsafeRawBufferPointer(rebasing: out[offset...])) : nil
        }
    }

    /// The whole records in the input not yet read by OpenSSL.
    public var bufferedRecords: Int? {
        var data: UnsafeMutablePointer<CChar>? = nil
        let n = igris_bio_mem_data(inputBIO, &data)
        return KernelTLS.wholeRecords(UnsafeRawBufferPointer(start: data.map { UnsafeRawPointer($0) }, count: max(0, n)))
    }
}
