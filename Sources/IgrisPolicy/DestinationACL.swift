/// Which destinations a SOCKS5 / HTTP CONNECT client may reach. Checked against the resolved
/// address, never the name, so a name that resolves to a private address (DNS rebinding)
/// is denied like the address itself.
///
/// Order: the operator's rules, first match wins; then the built-in deny list (loopback,
/// private, link-local, carrier-grade NAT, metadata, documentation, benchmarking, multicast
/// and reserved ranges, this host's own addresses, and IPv6 addresses that embed a denied
/// IPv4 one: NAT64, 6to4, Teredo); everything else is allowed.
public struct DestinationACL: Sendable {
    public enum Action: String, Sendable {
        case allow
        case deny
    }

    public struct Rule: Sendable, CustomStringConvertible {
        public var action: Action
        public var network: CIDR
        /// nil: every port.
        public var ports: [ClosedRange<UInt16>]?

        public init(action: Action, network: CIDR, ports: [ClosedRange<UInt16>]? = nil) {
            self.action = action
            self.network = network
            self.ports = ports
        }

        public func matches(_ address: IPAddress, port: UInt16) -> Bool {
            guard network.contains(address) else { return false }
            guard let ports else { return true }
            return ports.contains { $0.contains(port) }
        }

        public var description: String {
            var s = "\(action.rawValue) \(network)"
            if let ports { s += ":" + ports.map { $0.lowerBound == $0.upperBound ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)" }.joined(separator: ",") }
            return s
        }
    }

    /// Denied unless a rule allows them. `0.0.0.0/8` and `::/128` reach the local host as
    /// surely as loopback does; the IPv4 entries cover their IPv4-mapped IPv6 forms too.
    public static let deniedByDefault: [CIDR] = [
        "0.0.0.0/8", "127.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12",
        "192.168.0.0/16",
        // Special-purpose (RFC 6890): IETF protocol assignments, documentation, benchmarking,
        // multicast, reserved (with 255.255.255.255).
        "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        // IPv4-compatible (with :: and ::1), discard-only, documentation, site-local, multicast.
        "::/96", "100::/64", "2001:db8::/32", "fec0::/10", "ff00::/8",
        "fc00::/7", "fe80::/10",
    ].map { CIDR($0)! }

    /// The IPv4 address an IPv6 one carries, where its prefix says it leads there: NAT64
    /// (64:ff9b::/96 and the local-use 64:ff9b:1::/48, last 32 bits), 6to4 (2002::/16, bits
    /// 16–47) and Teredo (2001::/32: the client, stored inverted in the last 32 bits).
    public static func embeddedIPv4(_ a: IPAddress) -> IPAddress? {
        func v4(_ bits: UInt64) -> IPAddress { IPAddress(ipv4: UInt32(truncatingIfNeeded: bits)) }
        if a.high == 0x0064_ff9b_0000_0000 && a.low >> 32 == 0 { return v4(a.low) }
        if a.high >> 16 == 0x0064_ff9b_0001 { return v4(a.low) }
        if a.high >> 48 == 0x2002 { return v4(a.high >> 16) }
        if a.high >> 32 == 0x2001_0000 { return v4(~a.low) }
        return nil
    }

    /// The built-in deny list alone: the ranges above, this host's addresses, and the IPv4
    /// address an IPv6 one embeds.
    public static func deniedWithoutRule(_ address: IPAddress) -> Bool {
        if deniedByDefault.contains(where: { $0.contains(address) }) || HostAddresses.shared.contains(address) { return true }
        if let v4 = embeddedIPv4(address) {
            return deniedByDefault.contains(where: { $0.contains(v4) }) || HostAddresses.shared.contains(v4)
        }
        return false
    }

    public var rules: [Rule]

    public init(rules: [Rule] = []) {
        self.rules = rules
    }

    public func permits(_ address: IPAddress, port: UInt16) -> Bool {
        for rule in rules where rule.matches(address, port: port) {
            return rule.action == .allow
        }
        return !Self.deniedWithoutRule(address)
    }

    /// `CIDR[:PORTS]` as the command line takes it: `127.0.0.0/8`, `10.1.2.3/32:22`,
    /// `::1/128:8000-8100,9000`. The prefix length is required when ports follow.
    public static func parseRule(_ action: Action, _ text: String) -> Result<Rule, RuleError> {
        var networkText = text
        var portsText: Substring? = nil
        if let slash = text.lastIndex(of: "/"), let colon = text[slash...].firstIndex(of: ":") {
            networkText = String(text[..<colon])
            portsText = text[text.index(after: colon)...]
        } else if !text.contains("/") && text.filter({ $0 == ":" }).count == 1 {
            return .failure(RuleError(text: text, reason: "give the prefix length before ports: ADDRESS/LEN:PORTS"))
        }
        guard let network = CIDR(networkText) else {
            return .failure(RuleError(text: text, reason: "not an address or CIDR prefix"))
        }
        var rule = Rule(action: action, network: network)
        if let portsText {
            guard let ports = parsePorts(portsText) else {
                return .failure(RuleError(text: text, reason: "ports must be PORT, LOW-HIGH or a comma-separated list of them"))
            }
            rule.ports = ports
        }
        return .success(rule)
    }

    static func parsePorts(_ text: Substring) -> [ClosedRange<UInt16>]? {
        var ranges: [ClosedRange<UInt16>] = []
        for item in text.split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = item.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
            guard let low = UInt16(bounds[0]) else { return nil }
            let high = bounds.count == 2 ? UInt16(bounds[1]) : low
            guard let high, low <= high else { return nil }
            ranges.append(low...high)
        }
        return ranges.isEmpty ? nil : ranges
    }

    public struct RuleError: Error, CustomStringConvertible, Sendable {
        public var text: String
        public var reason: String
        public var description: String { "bad ACL rule '\(text)': \(reason)" }
    }
}
