import COpenSSL
import Glibc

public enum TLSVersion: String, Sendable, Equatable, CaseIterable {
    case tls12 = "1.2"
    case tls13 = "1.3"

    var openSSL: Int32 { self == .tls12 ? igris_tls1_2_version() : igris_tls1_3_version() }
}

/// A certificate chain (PEM, leaf first) and its private key.
public struct TLSCertificateFiles: Sendable, Equatable {
    public var certificate: String
    public var key: String

    public init(certificate: String, key: String) {
        self.certificate = certificate
        self.key = key
    }
}

/// A listener's TLS: what `tls:` in the configuration file says.
public struct TLSServerSettings: Sendable, Equatable {
    /// Served when SNI names none of `sniCertificates` (or is absent); nil: such clients are
    /// refused with an unrecognized_name alert.
    public var defaultCertificate: TLSCertificateFiles?
    /// Chosen by SNI: a certificate serves the names (CN, subjectAltName DNS, wildcards) it holds.
    public var sniCertificates: [TLSCertificateFiles] = []
    /// Client certificates are required and verified against this CA bundle; the
    /// certificate's name is the connection's user.
    public var clientCA: String?
    /// Revoked client certificates (PEM CRLs), checked for the leaf.
    public var crl: String?
    /// Which name of a client certificate names the user: its subject CN, or its first
    /// subjectAltName (DNS, e-mail or URI).
    public var clientIdentity: ClientIdentity = .commonName
    public var minVersion: TLSVersion = .tls12
    /// ALPN protocols offered, in preference order (empty: no ALPN).
    public var alpn: [String] = []
    /// `auto`: a TLS 1.3 connection of a forward listener goes to the kernel after its
    /// handshake where the kernel has kTLS (`KernelTLS.support`), else its records are carried
    /// without OpenSSL's `SSL` object (`TLSSession.protectRecordsItself`); `never`: OpenSSL
    /// carries every record.
    public var offload: Offload = .auto
    /// Capture each connection's traffic secrets so `TLSSession.kernelKeys` can derive the
    /// kernel's keys; on by itself where `offload` goes to the kernel (tests set it to check
    /// the derivation on a kernel without kTLS).
    public var exposeTrafficKeys = false
    /// Session tickets are encrypted under a key replaced this often (the previous one is
    /// still accepted for as long again).
    public var ticketKeySeconds: UInt32 = 3600

    public enum Offload: String, Sendable, Equatable {
        case auto
        case never
    }

    public enum ClientIdentity: String, Sendable, Equatable {
        case commonName = "cn"
        case subjectAltName = "san"
    }

    public init(certificate: TLSCertificateFiles? = nil) {
        defaultCertificate = certificate
    }

    /// Files it reads, for `igris check` and error messages.
    public var files: [String] {
        var paths = [defaultCertificate?.certificate, defaultCertificate?.key].compactMap { $0 }
        for c in sniCertificates { paths += [c.certificate, c.key] }
        return paths + [clientCA, crl].compactMap { $0 }
    }
}

/// `upstream_tls:`: TLS toward a forward listener's upstream servers.
public struct TLSClientSettings: Sendable, Equatable {
    /// Verify the server's certificate (against `ca`, or the system's CAs) and its name.
    public var verify = true
    public var ca: String?
    /// SNI and the name verified; nil: the server's address as written.
    public var serverName: String?
    /// A client certificate to present.
    public var certificate: TLSCertificateFiles?
    public var minVersion: TLSVersion = .tls12
    /// The highest version offered (nil: the library's, TLS 1.3), for servers that need less.
    public var maxVersion: TLSVersion?
    /// Offer the newest session ticket a server gave (an abbreviated handshake).
    public var resumeSessions = true
    /// See `TLSServerSettings.exposeTrafficKeys`.
    public var exposeTrafficKeys = false
    /// After the handshake (TLS 1.3) and the server's session ticket, the records go on
    /// without OpenSSL's `SSL` object (`TLSSession.protectRecordsItself`).
    public var protectRecordsItself = true

    public init() {}
}

/// A configuration problem, naming the file and what is wrong with it.
public struct TLSConfigurationError: Error, Sendable, CustomStringConvertible {
    public var description: String
    /// The settings key at fault (`certificate`, `key`, `client_ca`, `crl`, `ca`, `alpn`), when one is.
    public var key: String? {
        let word = description.prefix { $0 != " " && $0 != ":" }
        switch word {
        case "certificate", "key", "client_ca", "crl": return String(word)
        case "upstream_tls": return description.hasPrefix("upstream_tls ca") ? "ca" : nil
        case "tls": return description.hasPrefix("tls alpn") ? "alpn" : description.hasPrefix("tls crl") ? "crl" : nil
        default: return nil
        }
    }
    init(_ description: String) { self.description = description }
}

enum OpenSSLContext {
    static let cipherList = "ECDHE+AESGCM:ECDHE+CHACHA20"
    static let cipherSuites = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    static let groups = "X25519:P-256"

    /// A context with IGRIS's defaults: the version floor, AEAD suites only, X25519 and P-256,
    /// no renegotiation or compression, buffers released while idle.
    static func make(server: Bool, minVersion: TLSVersion) throws(TLSConfigurationError) -> OpaquePointer {
        guard let ctx = igris_ssl_ctx_new(server ? 1 : 0) else {
            throw TLSConfigurationError("tls: OpenSSL could not make a context: \(lastError())")
        }
        _ = igris_ssl_ctx_set_min_version(ctx, minVersion.openSSL)
        _ = SSL_CTX_set_options(ctx, igris_ssl_default_options())
        _ = SSL_CTX_set_cipher_list(ctx, cipherList)
        _ = SSL_CTX_set_ciphersuites(ctx, cipherSuites)
        _ = igris_ssl_ctx_set_groups(ctx, groups)
        _ = igris_ssl_ctx_set_mode(ctx, igris_mode_release_buffers())
        return ctx
    }

    static func loadCertificate(_ ctx: OpaquePointer, _ files: TLSCertificateFiles) throws(TLSConfigurationError) {
        try readable(files.certificate, what: "certificate")
        try readable(files.key, what: "key")
        var left: Int64 = 0
        guard igris_certificate_expiry(files.certificate, &left) == 0 else {
            throw TLSConfigurationError("certificate \(files.certificate): not a PEM certificate")
        }
        guard SSL_CTX_use_certificate_chain_file(ctx, files.certificate) == 1 else {
            throw TLSConfigurationError("certificate \(files.certificate): \(lastError())")
        }
        if left < 0 { throw TLSConfigurationError("certificate \(files.certificate): expired \(-left / 86400) days ago") }
        guard SSL_CTX_use_PrivateKey_file(ctx, files.key, SSL_FILETYPE_PEM) == 1 else {
            if igris_err_reason(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH {
                ERR_clear_error()
                throw TLSConfigurationError("key \(files.key) does not match certificate \(files.certificate)")
            }
            throw TLSConfigurationError("key \(files.key): \(lastError())")
        }
        guard SSL_CTX_check_private_key(ctx) == 1 else {
            ERR_clear_error()
            throw TLSConfigurationError("key \(files.key) does not match certificate \(files.certificate)")
        }
    }

    static func loadCA(_ ctx: OpaquePointer, _ path: String, what: String) throws(TLSConfigurationError) {
        try readable(path, what: what)
        guard SSL_CTX_load_verify_locations(ctx, path, nil) == 1 else {
            throw TLSConfigurationError("\(what) \(path): does not parse as PEM certificates: \(lastError())")
        }
    }

    static func readable(_ path: String, what: String) throws(TLSConfigurationError) {
        guard access(path, R_OK) == 0 else {
            throw TLSConfigurationError("\(what) \(path): \(String(cString: strerror(errno)))")
        }
    }

    /// The files as they are now (path, size, modification time): a reload rebuilds a
    /// listener whose certificate files changed.
    static func fingerprint(_ paths: [String]) -> String {
        paths.map { path -> String in
            var st = stat()
            guard stat(path, &st) == 0 else { return path }
            return "\(path)@\(st.st_size).\(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec)"
        }.joined(separator: ",")
    }

    static func lastError() -> String {
        let code = ERR_peek_last_error()
        defer { ERR_clear_error() }
        guard code != 0 else { return "unknown error" }
        var text = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &text, text.count)
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A listener's TLS contexts (one per certificate, chosen by SNI), shared by every worker:
/// OpenSSL contexts are safe to make sessions from on any thread. Built once at start and on
/// each reload; connections keep the context they began with.
public final class TLSServerContext: @unchecked Sendable {
    public let settings: TLSServerSettings
    /// The settings and the state of their files when loaded (see `OpenSSLContext.fingerprint`).
    public let fingerprint: String
    /// Connections may go to the kernel after their handshake (`offload` and the kernel allow).
    public let offloadsToKernel: Bool
    /// Connections that stay in user space drop OpenSSL's `SSL` after their handshake (`offload: auto`).
    public let protectsRecordsItself: Bool
    /// The context handshakes start on: the default certificate's, or the first SNI one's.
    private let primary: OpaquePointer
    /// SNI: each certificate's context and its leaf (for X509_check_host).
    private let byName: [(ctx: OpaquePointer, leaf: OpaquePointer)]
    private let alpnWire: UnsafeMutablePointer<UInt8>?

    public init(_ settings: TLSServerSettings) throws(TLSConfigurationError) {
        self.settings = settings
        fingerprint = "\(settings.minVersion.rawValue);\(settings.alpn);\(settings.clientIdentity.rawValue);\(settings.offload.rawValue);"
            + OpenSSLContext.fingerprint(settings.files)
        offloadsToKernel = settings.offload == .auto && KernelTLS.support.available
        protectsRecordsItself = settings.offload == .auto
        let files = (settings.defaultCertificate.map { [$0] } ?? []) + settings.sniCertificates
        guard !files.isEmpty else { throw TLSConfigurationError("tls: needs a certificate and key") }
        var wire: [UInt8] = []
        for p in settings.alpn {
            guard !p.isEmpty && p.utf8.count < 256 else { throw TLSConfigurationError("tls alpn: \"\(p)\" is not a protocol name") }
            wire.append(UInt8(p.utf8.count))
            wire += Array(p.utf8)
        }
        if wire.isEmpty {
            alpnWire = nil
        } else {
            alpnWire = .allocate(capacity: wire.count)
            alpnWire!.initialize(from: wire, count: wire.count)
        }
        var contexts: [(OpaquePointer, OpaquePointer)] = []
        do throws(TLSConfigurationError) {
            for f in files {
                let ctx = try OpenSSLContext.make(server: true, minVersion: settings.minVersion)
                contexts.append((ctx, ctx))
                try OpenSSLContext.loadCertificate(ctx, f)
                try Self.configure(ctx, settings, alpn: alpnWire, alpnLength: wire.count)
                if (offloadsToKernel || protectsRecordsItself || settings.exposeTrafficKeys) && igris_ssl_ctx_capture_traffic_secrets(ctx) != 0 {
                    throw TLSConfigurationError("tls: traffic secrets for kTLS: \(OpenSSLContext.lastError())")
                }
                guard let leaf = SSL_CTX_get0_certificate(ctx) else { throw TLSConfigurationError("certificate \(f.certificate): no certificate") }
                contexts[contexts.count - 1].1 = leaf
            }
        } catch {
            for (ctx, _) in contexts { SSL_CTX_free(ctx) }
            alpnWire?.deallocate()
            throw error
        }
        primary = contexts[0].0
        byName = settings.defaultCertificate == nil ? contexts : Array(contexts.dropFirst())
        if !byName.isEmpty || settings.defaultCertificate == nil {
            igris_ssl_ctx_set_sni(primary, { ssl, arg in
                let me = Unmanaged<TLSServerContext>.fromOpaque(arg!).takeUnretainedValue()
                return me.selectCertificate(ssl!) ? 0 : 1
            }, Unmanaged.passUnretained(self).toOpaque())
        }
    }

    deinit {
        for (ctx, _) in byName where ctx != primary { SSL_CTX_free(ctx) }
        SSL_CTX_free(primary)
        alpnWire?.deallocate()
    }

    private static func configure(_ ctx: OpaquePointer, _ s: TLSServerSettings, alpn: UnsafeMutablePointer<UInt8>?, alpnLength: Int) throws(TLSConfigurationError) {
        // Stateless tickets only: no per-session memory in the process.
        _ = igris_ssl_ctx_set_session_cache_mode(ctx, Int(SSL_SESS_CACHE_OFF))
        _ = SSL_CTX_set_num_tickets(ctx, 1)
        let id: [UInt8] = Array("igris".utf8)
        _ = SSL_CTX_set_session_id_context(ctx, id, UInt32(id.count))
        guard igris_ssl_ctx_rotate_ticket_keys(ctx, s.ticketKeySeconds) == 0 else {
            throw TLSConfigurationError("tls: session ticket keys: \(OpenSSLContext.lastError())")
        }
        if let ca = s.clientCA {
            try OpenSSLContext.loadCA(ctx, ca, what: "client_ca")
            guard let names = SSL_load_client_CA_file(ca) else {
                throw TLSConfigurationError("client_ca \(ca): no CA certificate in it")
            }
            SSL_CTX_set_client_CA_list(ctx, names)
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nil)
            if let crl = s.crl {
                try OpenSSLContext.readable(crl, what: "crl")
                guard igris_ssl_ctx_load_crl(ctx, crl) > 0 else {
                    throw TLSConfigurationError("crl \(crl): does not parse as PEM CRLs: \(OpenSSLContext.lastError())")
                }
            }
        } else if s.crl != nil {
            throw TLSConfigurationError("tls crl: needs client_ca (it revokes client certificates)")
        }
        if let alpn { igris_ssl_ctx_set_alpn_select(ctx, alpn, UInt32(alpnLength)) }
    }

    /// SNI: moves the handshake to the certificate serving the name; false refuses it (no
    /// certificate for the name and no default).
    private func selectCertificate(_ ssl: OpaquePointer) -> Bool {
        if let name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name) {
            let length = strlen(name)
            for (ctx, leaf) in byName where X509_check_host(leaf, name, length, 0, nil) == 1 {
                if ctx != primary { _ = SSL_set_SSL_CTX(ssl, ctx) }
                return true
            }
        }
        return settings.defaultCertificate != nil
    }

    public func makeSession() -> TLSSession? { TLSSession(context: primary, server: true, owner: self) }
}

/// `upstream_tls`'s context: verification on by default, optional client certificate.
public final class TLSClientContext: @unchecked Sendable {
    public let settings: TLSClientSettings
    public let fingerprint: String
    private let ctx: OpaquePointer

    public init(_ settings: TLSClientSettings) throws(TLSConfigurationError) {
        self.settings = settings
        let files = [settings.ca, settings.certificate?.certificate, settings.certificate?.key].compactMap { $0 }
        fingerprint = "\(settings.verify);\(settings.serverName ?? "-");\(settings.minVersion.rawValue);\(settings.maxVersion?.rawValue ?? "-");\(settings.resumeSessions);"
            + OpenSSLContext.fingerprint(files)
        ctx = try OpenSSLContext.make(server: false, minVersion: settings.minVersion)
        if let max = settings.maxVersion { _ = igris_ssl_ctx_set_max_version(ctx, max.openSSL) }
        do throws(TLSConfigurationError) {
            if settings.verify {
                if let ca = settings.ca {
                    try OpenSSLContext.loadCA(ctx, ca, what: "upstream_tls ca")
                } else if SSL_CTX_set_default_verify_paths(ctx) != 1 {
                    throw TLSConfigurationError("upstream_tls: the system's CA certificates could not be loaded")
                }
                SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nil)
            }
            if let c = settings.certificate { try OpenSSLContext.loadCertificate(ctx, c) }
            if (settings.exposeTrafficKeys || settings.protectRecordsItself) && igris_ssl_ctx_capture_traffic_secrets(ctx) != 0 {
                throw TLSConfigurationError("upstream_tls: traffic secrets: \(OpenSSLContext.lastError())")
            }
            if settings.resumeSessions && igris_ssl_ctx_remember_sessions(ctx) != 0 {
                throw TLSConfigurationError("upstream_tls: session cache: \(OpenSSLContext.lastError())")
            }
        } catch {
            SSL_CTX_free(ctx)
            throw error
        }
    }

    deinit { SSL_CTX_free(ctx) }

    /// A client session for a server known as `host` (its address when no server_name is
    /// set): SNI, and the name its certificate must hold.
    public func makeSession(host: String) -> TLSSession? {
        guard let session = TLSSession(context: ctx, server: false, owner: self) else { return nil }
        if settings.resumeSessions { igris_ssl_resume(session.ssl) }
        let name = settings.serverName ?? host
        if !name.isEmpty && !name.contains(":") && !name.allSatisfy({ $0.isNumber || $0 == "." }) {
            _ = igris_ssl_set_host_name(session.ssl, name)
        }
        if settings.verify && !name.isEmpty {
            if name.contains(":") || name.allSatisfy({ $0.isNumber || $0 == "." }) {
                _ = igris_ssl_expect_ip(session.ssl, name)
            } else {
                _ = SSL_set1_host(session.ssl, name)
            }
        }
        return session
    }
}
