import IgrisPolicy
import IgrisTLS

/// `tls:` on a listener and `upstream_tls:` on a forward listener or pool: parsed, and the
/// contexts built there and then, so a missing file, a key that doesn't match its
/// certificate, an expired certificate or a CA that doesn't parse is reported with its key
/// path and line (`igris check` and `serve` alike). Paths are as written: absolute, or
/// relative to the working directory.
struct TLSServerSection: Decodable {
    var context: TLSServerContext

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["certificate", "key", "sni", "client_ca", "crl", "client_identity", "min_version", "alpn", "offload"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        func key(_ s: String) -> AnyCodingKey { AnyCodingKey(stringValue: s) }
        func fail(_ k: String, _ message: String) -> DecodingError {
            .dataCorrupted(.init(codingPath: c.codingPath + [key(k)], debugDescription: message))
        }
        var settings = TLSServerSettings()
        settings.defaultCertificate = try certificatePair(c)
        settings.sniCertificates = try c.decodeIfPresent([CertificatePair].self, forKey: key("sni"))?.map(\.files) ?? []
        if settings.defaultCertificate == nil && settings.sniCertificates.isEmpty {
            throw DecodingError.keyNotFound(key("certificate"), .init(codingPath: c.codingPath, debugDescription: "tls needs certificate and key (or sni: [{certificate, key}, …])"))
        }
        settings.clientCA = try c.decodeIfPresent(String.self, forKey: key("client_ca"))
        settings.crl = try c.decodeIfPresent(String.self, forKey: key("crl"))
        if let text = try c.decodeIfPresent(String.self, forKey: key("client_identity")) {
            guard let v = TLSServerSettings.ClientIdentity(rawValue: text) else { throw fail("client_identity", "expected cn or san, got '\(text)'") }
            guard settings.clientCA != nil else { throw fail("client_identity", "only with client_ca") }
            settings.clientIdentity = v
        }
        if let v = try Self.version(c, "min_version") { settings.minVersion = v }
        settings.alpn = try c.decodeIfPresent([String].self, forKey: key("alpn")) ?? []
        if let text = try c.decodeIfPresent(String.self, forKey: key("offload")) {
            guard let v = TLSServerSettings.Offload(rawValue: text) else { throw fail("offload", "expected auto or never, got '\(text)'") }
            settings.offload = v
        }
        do {
            context = try TLSServerContext(settings)
        } catch {
            throw fail(error.key ?? "certificate", error.description)
        }
    }

    static func version(_ c: KeyedDecodingContainer<AnyCodingKey>, _ k: String) throws -> TLSVersion? {
        guard let text = try c.decodeIfPresent(String.self, forKey: AnyCodingKey(stringValue: k)) else { return nil }
        guard let v = TLSVersion(rawValue: text) else {
            throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [AnyCodingKey(stringValue: k)], debugDescription: "expected \"1.2\" or \"1.3\", got '\(text)'"))
        }
        return v
    }
}

/// `certificate:` and `key:` of a section: both, or neither.
private func certificatePair(_ c: KeyedDecodingContainer<AnyCodingKey>) throws -> TLSCertificateFiles? {
    let certificate = try c.decodeIfPresent(String.self, forKey: AnyCodingKey(stringValue: "certificate"))
    let privateKey = try c.decodeIfPresent(String.self, forKey: AnyCodingKey(stringValue: "key"))
    switch (certificate, privateKey) {
    case (let cert?, let k?): return TLSCertificateFiles(certificate: cert, key: k)
    case (nil, nil): return nil
    case (nil, _), (_, nil):
        let (missing, given) = certificate == nil ? ("certificate", "key") : ("key", "certificate")
        throw DecodingError.dataCorrupted(.init(codingPath: c.codingPath + [AnyCodingKey(stringValue: given)], debugDescription: "needs \(missing) too"))
    }
}

private struct CertificatePair: Decodable {
    var files: TLSCertificateFiles

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["certificate", "key"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        files = TLSCertificateFiles(certificate: try c.decode(String.self, forKey: AnyCodingKey(stringValue: "certificate")),
                                    key: try c.decode(String.self, forKey: AnyCodingKey(stringValue: "key")))
    }
}

struct TLSClientSection: Decodable {
    var context: TLSClientContext

    init(from decoder: Decoder) throws {
        try decoder.rejectUnknownKeys(["verify", "ca", "server_name", "certificate", "key", "min_version", "max_version"])
        let c = try decoder.container(keyedBy: AnyCodingKey.self)
        func key(_ s: String) -> AnyCodingKey { AnyCodingKey(stringValue: s) }
        func fail(_ k: String, _ message: String) -> DecodingError {
            .dataCorrupted(.init(codingPath: c.codingPath + [key(k)], debugDescription: message))
        }
        var settings = TLSClientSettings()
        settings.verify = try c.decodeIfPresent(Bool.self, forKey: key("verify")) ?? true
        settings.ca = try c.decodeIfPresent(String.self, forKey: key("ca"))
        settings.serverName = try c.decodeIfPresent(String.self, forKey: key("server_name"))
        settings.certificate = try certificatePair(c)
        if let v = try TLSServerSection.version(c, "min_version") { settings.minVersion = v }
        settings.maxVersion = try TLSServerSection.version(c, "max_version")
        do {
            context = try TLSClientContext(settings)
        } catch {
            throw fail(error.key ?? "ca", error.description)
        }
    }
}
