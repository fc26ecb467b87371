import COpenSSL
import Glibc
import Testing

/// IGRIS's provider serves OpenSSL's TLS 1.3 key schedule ("TLS13-KDF", keyschedule.c): for
/// the same inputs it must give exactly what OpenSSL's own default provider gives.
@Suite struct KeyScheduleTests {
    /// One TLS13-KDF derivation through the named provider; nil when it failed.
    static func derive(provider: String, digest: String, mode: Int32, key: [UInt8]?, salt: [UInt8]?,
                       label: String, data: [UInt8]?, length: Int) -> [UInt8]? {
        guard let kdf = EVP_KDF_fetch(nil, "TLS13-KDF", "provider=\(provider)") else { return nil }
        defer { EVP_KDF_free(kdf) }
        guard String(cString: OSSL_PROVIDER_get0_name(EVP_KDF_get0_provider(kdf))) == provider,
              let ctx = EVP_KDF_CTX_new(kdf) else { return nil }
        defer { EVP_KDF_CTX_free(ctx) }
        // OSSL_PARAM keeps pointers: everything it points at lives until the derivation is done.
        var held: [UnsafeMutableRawPointer] = []
        defer { held.forEach { free($0) } }
        func text(_ s: String) -> UnsafeMutablePointer<CChar> {
            let p = strdup(s)!
            held.append(UnsafeMutableRawPointer(p))
            return p
        }
        func bytes(_ b: [UInt8]) -> (UnsafeMutableRawPointer, Int) {
            let p = malloc(max(1, b.count))!
            b.withUnsafeBytes { if let base = $0.baseAddress { p.copyMemory(from: base, byteCount: b.count) } }
            held.append(p)
            return (p, b.count)
        }
        let modeValue = malloc(MemoryLayout<Int32>.size)!.bindMemory(to: Int32.self, capacity: 1)
        modeValue.pointee = mode
        held.append(UnsafeMutableRawPointer(modeValue))
        var params = [
            OSSL_PARAM_construct_int(text("mode"), modeValue),
            OSSL_PARAM_construct_utf8_string(text("digest"), text(digest), 0),
        ]
        for (name, value) in [("key", key), ("salt", salt), ("prefix", Array("tls13 ".utf8)), ("label", Array(label.utf8)), ("data", data)] {
            guard let value else { continue }
            let (p, n) = bytes(value)
            params.append(OSSL_PARAM_construct_octet_string(text(name), p, n))
        }
        params.append(OSSL_PARAM_construct_end())
        var out = [UInt8](repeating: 0, count: length)
        return EVP_KDF_derive(ctx, &out, length, params) == 1 ? out : nil
    }

    static func random(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8.random(in: 0...255) } }

    @Test(arguments: [("SHA256", 32), ("SHA384", 48), ("SHA512", 64)])  // SHA-512: no suite uses it; fetched per context
    func matchesOpenSSL(digest: String, hash: Int) {
        SSL_CTX_free(igris_ssl_ctx_new(1))  // loads the provider
        let expand = EVP_KDF_HKDF_MODE_EXPAND_ONLY, extract = EVP_KDF_HKDF_MODE_EXTRACT_ONLY
        let secret = Self.random(hash), transcript = Self.random(hash)
        // Expand-Label as the handshake uses it: secrets (with the transcript), keys and IVs
        // (no context), and an output of several blocks.
        let expansions: [(String, [UInt8]?, Int)] = [
            ("c ap traffic", transcript, hash), ("s hs traffic", transcript, hash), ("key", nil, 16), ("key", nil, 32),
            ("iv", nil, 12), ("finished", nil, hash), ("resumption", Array("nonce".utf8), hash), ("long", transcript, 2 * hash + 5),
        ]
        for (label, data, length) in expansions {
            let ours = Self.derive(provider: "igris", digest: digest, mode: expand, key: secret, salt: nil, label: label, data: data, length: length)
            let theirs = Self.derive(provider: "default", digest: digest, mode: expand, key: secret, salt: nil, label: label, data: data, length: length)
            #expect(ours != nil && ours == theirs, "expand \(label) \(length)")
        }
        // Extract ("generate secret"): the early secret (no previous, a PSK or zeros), and the
        // later ones (a previous secret through "derived", an ECDHE secret or zeros).
        let extractions: [([UInt8]?, [UInt8]?)] = [(nil, nil), (Self.random(hash), nil), (Self.random(32), secret), (nil, secret)]
        for (key, previous) in extractions {
            let ours = Self.derive(provider: "igris", digest: digest, mode: extract, key: key, salt: previous, label: "derived", data: nil, length: hash)
            let theirs = Self.derive(provider: "default", digest: digest, mode: extract, key: key, salt: previous, label: "derived", data: nil, length: hash)
            #expect(ours != nil && ours == theirs, "extract key \(key?.count ?? 0) previous \(previous?.count ?? 0)")
        }
    }

    @Test("a context prefers the provider's TLS13-KDF; other algorithms still come from OpenSSL's")
    func contextFetchesTheProvider() throws {
        let ctx = try #require(igris_ssl_ctx_new(1))
        defer { SSL_CTX_free(ctx) }
        let kdf = try #require(EVP_KDF_fetch(nil, "TLS13-KDF", "?provider=igris"))
        defer { EVP_KDF_free(kdf) }
        #expect(String(cString: OSSL_PROVIDER_get0_name(EVP_KDF_get0_provider(kdf))) == "igris")
        let hkdf = try #require(EVP_KDF_fetch(nil, "HKDF", "?provider=igris"))
        defer { EVP_KDF_free(hkdf) }
        #expect(String(cString: OSSL_PROVIDER_get0_name(EVP_KDF_get0_provider(hkdf))) == "default")
    }
}
