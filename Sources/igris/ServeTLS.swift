import IgrisEngine
import IgrisNegotiation
import IgrisTLS
import ArgumentParser
import Logging

/// The listeners given by flags (--listen/--upstream, --socks5, --http-connect), with the
/// TLS flags applied to each.
extension Serve {
    func validateTLSFlags() throws {
        if (tlsCertificate == nil) != (tlsKey == nil) { throw ValidationError("--tls-cert and --tls-key go together") }
        if tlsCertificate == nil && (tlsClientCA != nil || tlsMinVersion != nil) {
            throw ValidationError("--tls-client-ca and --tls-min-version need --tls-cert and --tls-key")
        }
        if let v = tlsMinVersion, TLSVersion(rawValue: v) == nil { throw ValidationError("--tls-min-version: expected 1.2 or 1.3, got '\(v)'") }
        if (upstreamTLS || upstreamTLSCA != nil) && upstream.isEmpty { throw ValidationError("--upstream-tls applies to --upstream, and none is given") }
        if !upstreamSource.isEmpty && upstream.isEmpty { throw ValidationError("--upstream-source applies to --upstream, and none is given") }
        for text in upstreamSource {
            if case .failure(let problem) = UpstreamPool.source(text) { throw ValidationError("--upstream-source: \(problem)") }
        }
        if tlsCertificate != nil && bufferSize < 32 * 1024 { throw ValidationError("TLS needs --buffer-size of at least 32768") }
    }

    func commandLineRules(gateway: Gateway) throws -> [ListenerRule] {
        var rules: [ListenerRule] = []
        do {
            var server: TLSServerContext? = nil
            if let tlsCertificate, let tlsKey {
                var settings = TLSServerSettings(certificate: TLSCertificateFiles(certificate: tlsCertificate, key: tlsKey))
                settings.clientCA = tlsClientCA
                settings.minVersion = tlsMinVersion.flatMap(TLSVersion.init(rawValue:)) ?? .tls12
                server = try TLSServerContext(settings)
            }
            var client: TLSClientContext? = nil
            if upstreamTLS || upstreamTLSCA != nil {
                var settings = TLSClientSettings()
                settings.ca = upstreamTLSCA
                client = try TLSClientContext(settings)
            }
            let sources = try upstreamSource.map { try UpstreamPool.source($0).get() }
            for (l, u) in zip(listen, upstream) {
                let address = try SocketAddress.resolve(l, passive: true)
                var rule = ListenerRule(listen: address, pool: UpstreamPool(name: address.description, servers: [try SocketAddress.resolve(u)], tls: client,
                                                                              sources: sources))
                rule.tls = server
                rule.handshakeTimeoutNanoseconds = handshakeTimeout.nanoseconds
                rules.append(rule)
            }
            let options = GatewayOptions(requireAuthentication: !noAuth, handshakeTimeoutNanoseconds: handshakeTimeout.nanoseconds)
            for (mode, addresses) in [(ListenerMode.socks5, socks5), (.httpConnect, httpConnect)] {
                for l in addresses {
                    var rule = try gateway.rule(listen: try SocketAddress.resolve(l, passive: true), mode: mode, options: options)
                    rule.tls = server
                    rules.append(rule)
                }
            }
        } catch let error as GatewayError {
            throw CommandFailure(error.description)
        } catch let error as TLSConfigurationError {
            throw CommandFailure(error.description)
        } catch {
            throw CommandFailure("\(error)")
        }
        return rules
    }

    /// SIGHUP without a configuration file: certificates and keys read again; listeners whose
    /// files changed take the new ones, open connections keep theirs.
    func reloadCommandLineTLS(server: Server, gateway: Gateway, logger: Logger) {
        do {
            let summary = try server.reload(listeners: try commandLineRules(gateway: gateway))
            logger.notice("certificates reloaded", metadata: ["changed": "\(summary.added.joined(separator: ","))"])
        } catch {
            logger.error("reload rejected; the running certificates stay", metadata: ["error": "\(error)"])
        }
    }
}
