import COpenSSL

/// Why a TLS handshake or connection failed: a metric label (`igris_tls_handshake_failures_total
/// {reason}`) plus OpenSSL's own words for the log.
public struct TLSFailure: Equatable, Sendable, Error, CustomStringConvertible {
    public enum Reason: String, Sendable, CaseIterable {
        /// Not TLS at all: an HTTP request, a SOCKS greeting, garbage (wrong record version).
        case plaintext
        /// A version below the listener's minimum, or none in common.
        case version
        /// No cipher suite, group or signature algorithm in common.
        case cipher
        /// SNI named a host no certificate serves, and there is no default certificate.
        case unknownName = "unknown_name"
        /// No ALPN protocol in common.
        case alpn
        /// The client certificate was missing, unverifiable, revoked, or from another CA.
        case clientCertificate = "client_certificate"
        /// upstream_tls: the server's certificate did not verify.
        case serverCertificate = "server_certificate"
        /// A record failed authentication (bad MAC, tampered or replayed bytes).
        case badRecord = "bad_record"
        /// The peer sent a fatal alert.
        case peerAlert = "peer_alert"
        /// A malformed message: truncated, oversized, out of order.
        case malformed
        /// The peer closed or reset the connection before the handshake finished.
        case peerGone = "peer_gone"
        /// The handshake did not finish in time.
        case timeout
    }

    public var reason: Reason
    public var detail: String

    public init(_ reason: Reason, _ detail: String) {
        self.reason = reason
        self.detail = detail
    }

    public var description: String { "\(reason.rawValue): \(detail)" }

    /// The failure OpenSSL just reported for `ssl` (SSL_get_error's `error`), from its queue.
    static func current(ssl: OpaquePointer, error: Int32) -> TLSFailure {
        let code = ERR_peek_last_error()
        defer { ERR_clear_error() }
        if code == 0 {
            if error == SSL_ERROR_SYSCALL || error == SSL_ERROR_ZERO_RETURN { return TLSFailure(.peerGone, "the peer closed the connection") }
            return TLSFailure(.malformed, "TLS error \(error)")
        }
        var text = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &text, text.count)
        let detail = String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let verify = SSL_get_verify_result(ssl)
        return TLSFailure(classify(reason: igris_err_reason(code), server: SSL_is_server(ssl) == 1, verify: Int32(verify)), detail)
    }

    static func classify(reason r: Int32, server: Bool, verify: Int32) -> Reason {
        switch r {
        case SSL_R_HTTP_REQUEST, SSL_R_HTTPS_PROXY_REQUEST, SSL_R_WRONG_VERSION_NUMBER, SSL_R_UNSUPPORTED_SSL_VERSION:
            return .plaintext
        case SSL_R_UNSUPPORTED_PROTOCOL, SSL_R_VERSION_TOO_LOW, SSL_R_NO_PROTOCOLS_AVAILABLE:
            return .version
        case SSL_R_NO_SHARED_CIPHER, SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM:
            return .cipher
        case SSL_R_CALLBACK_FAILED, SSL_R_CLIENTHELLO_TLSEXT:
            return .unknownName
        case SSL_R_NO_APPLICATION_PROTOCOL:
            return .alpn
        case SSL_R_CERTIFICATE_VERIFY_FAILED, SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
            return server ? .clientCertificate : .serverCertificate
        case SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC:
            return .badRecord
        case SSL_R_UNEXPECTED_EOF_WHILE_READING:
            return .peerGone
        default:
            if r > SSL_AD_REASON_OFFSET { return .peerAlert }
            return .malformed
        }
    }
}
