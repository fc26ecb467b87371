import IgrisEngine
import IgrisPolicy
import IgrisProtocols

/// What a UDP association remembers: where its client has sent (replies are relayed only
/// from there) and the datagrams waiting for a name.
final class DatagramRelayState {
    /// Destinations per association at most: a client can't make the relay a scanner's
    /// fan-out, nor grow this set without bound.
    static let maxDestinations = 256
    /// Datagrams held while their names resolve, at most.
    static let maxHeld = 32

    struct Endpoint: Hashable {
        var ip: IPAddress
        var port: UInt16
    }

    var destinations = Set<Endpoint>()
    var held: [(name: String, port: UInt16, payload: [UInt8])] = []
    var resolving = Set<String>()
    var ready: [(destination: SocketAddress, payload: [UInt8])] = []
}

/// SOCKS5 UDP ASSOCIATE (RFC 1928 §7): the request, then every datagram's destination —
/// authenticated like CONNECT, the ACL on each resolved address, names through the resolver
/// and its cache (never a blocking lookup on the worker), and the user's connection count.
extension GatewayNegotiation: DatagramPolicy {
    /// The client asked for an association: it counts as one of its user's connections.
    func associate(_ request: Socks5.Request) -> NegotiationAction {
        destinationDescription = "udp"
        guard holdUserConnection() else { return NegotiationAction(reply: Socks5.reply(.notAllowedByRuleset), .close(.refused)) }
        udp = DatagramRelayState()
        // DST.ADDR/DST.PORT: where the client will send from, if it knows; only its port
        // matters here (the address is the control connection's own).
        return NegotiationAction(.associate(clientPort: request.port))
    }

    func associated(relay: SocketAddress?) -> NegotiationAction {
        guard let relay else { return NegotiationAction(reply: Socks5.reply(.generalFailure), .close(.refused)) }
        destinationDescription = "udp relay \(relay)"
        return NegotiationAction(reply: Socks5.reply(.succeeded, bound: Socks5.Address(relay.ipAddress), port: relay.port), .read)
    }

    func route(_ datagram: UnsafeRawBufferPointer) -> DatagramRoute {
        guard let state = udp else { return .drop(.malformed) }
        let header: Socks5UDP.Header
        switch Socks5UDP.parse(datagram) {
        case .success(let h): header = h
        case .failure(.fragmented): return .drop(.fragmented)
        case .failure: return .drop(.malformed)
        }
        func sendOrDrop(_ admitted: Result<SocketAddress, DatagramDrop>) -> DatagramRoute {
            switch admitted {
            case .success(let destination): return .send(destination, payloadOffset: header.length)
            case .failure(let drop): return .drop(drop)
            }
        }
        switch header.address {
        case let .ipv4(a, b, c, d):
            return sendOrDrop(admit(SocketAddress(ip: IPAddress(ipv4: a, b, c, d), port: header.port), state))
        case .ipv6(let bytes):
            return sendOrDrop(admit(SocketAddress(ip: IPAddress(ipv6: bytes), port: header.port), state))
        case .domain(let name):
            switch policy.resolver.cached(name, port: header.port) {
            case .failure?: return .drop(.unresolved)
            case .success(let addresses)?: return sendOrDrop(firstAdmitted(addresses, state))
            case nil: break
            }
            guard state.held.count < DatagramRelayState.maxHeld else { return .drop(.limit) }
            state.held.append((name, header.port, Array(UnsafeRawBufferPointer(rebasing: datagram[header.length...]))))
            if state.resolving.insert(name).inserted {
                let resolver = policy.resolver
                let resume = context.resume
                factory.gateway.offload { resume(OffloadAnswer.resolved(name, resolver.resolve(name, port: 0))) }
            }
            return .held
        }
    }

    func writeReplyHeader(from source: SocketAddress, into header: UnsafeMutableRawBufferPointer) -> Int? {
        let ip = source.ipAddress
        guard let state = udp, state.destinations.contains(DatagramRelayState.Endpoint(ip: ip, port: source.port)) else { return nil }
        return Socks5UDP.writeHeader(high: ip.high, low: ip.low, port: source.port, into: header)
    }

    func takeResolved() -> [(destination: SocketAddress, payload: [UInt8])] {
        guard let state = udp else { return [] }
        defer { state.ready.removeAll() }
        return state.ready
    }

    /// A name the held datagrams waited for: each goes to the first address the ACL allows,
    /// or is dropped and counted.
    func resolvedForDatagrams(_ name: String, _ result: Result<[SocketAddress], ResolveFailure>) {
        guard let state = udp else { return }
        state.resolving.remove(name)
        var still: [(name: String, port: UInt16, payload: [UInt8])] = []
        for held in state.held {
            guard held.name == name else { still.append(held); continue }
            switch result {
            case .failure:
                statistics.add(WorkerStatistics.udpDropCounter(.unresolved))
            case .success(let addresses):
                switch firstAdmitted(addresses.map { $0.withPort(held.port) }, state) {
                case .success(let destination): state.ready.append((destination, held.payload))
                case .failure(let drop): statistics.add(WorkerStatistics.udpDropCounter(drop))
                }
            }
        }
        state.held = still
    }

    private func firstAdmitted(_ addresses: [SocketAddress], _ state: DatagramRelayState) -> Result<SocketAddress, DatagramDrop> {
        var last = DatagramDrop.unresolved
        for address in addresses {
            switch admit(address, state) {
            case .success(let destination): return .success(destination)
            case .failure(let drop): last = drop
            }
        }
        return .failure(last)
    }

    /// A destination this association has used, or a new one the ACL allows (within the bound).
    private func admit(_ address: SocketAddress, _ state: DatagramRelayState) -> Result<SocketAddress, DatagramDrop> {
        let endpoint = DatagramRelayState.Endpoint(ip: address.ipAddress, port: address.port)
        if state.destinations.contains(endpoint) { return .success(address) }
        guard policy.acl.permits(endpoint.ip, port: endpoint.port) else { return .failure(.denied) }
        guard state.destinations.count < DatagramRelayState.maxDestinations else { return .failure(.limit) }
        state.destinations.insert(endpoint)
        return .success(address)
    }
}
