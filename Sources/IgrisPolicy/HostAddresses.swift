import Glibc

/// The addresses of this host's own interfaces, which a proxy client must not reach by
/// default: they lead to whatever listens on 0.0.0.0 here (igris's own admin endpoint and
/// listeners included, and a loop through itself). Read with getifaddrs at start, on SIGHUP
/// (`refresh()`) and every 30 s by a thread of its own, since addresses come and go (DHCP).
public final class HostAddresses: Sendable {
    public static let shared = HostAddresses()

    private let addresses = Locked<Set<IPAddress>>([])
    private let started = Locked(false)

    init() { refresh() }

    public func contains(_ address: IPAddress) -> Bool { addresses.withLock { $0.contains(address) } }

    public var current: Set<IPAddress> { addresses.withLock { $0 } }

    /// Replaces the set for tests of the policy.
    public func set(_ list: Set<IPAddress>) { addresses.withLock { $0 = list } }

    /// Reads the interfaces' addresses now.
    public func refresh() {
        var list: UnsafeMutablePointer<ifaddrs>? = nil
        guard getifaddrs(&list) == 0 else { return }
        defer { freeifaddrs(list) }
        var found: Set<IPAddress> = []
        var entry = list
        while let e = entry {
            if let sa = e.pointee.ifa_addr {
                switch Int32(sa.pointee.sa_family) {
                case AF_INET:
                    found.insert(sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) {
                        IPAddress(ipv4: UInt32(bigEndian: $0.pointee.sin_addr.s_addr))
                    })
                case AF_INET6:
                    sa.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) {
                        var a = $0.pointee.sin6_addr
                        found.insert(withUnsafeBytes(of: &a) { IPAddress(ipv6: $0) })
                    }
                default:
                    break
                }
            }
            entry = e.pointee.ifa_next
        }
        addresses.withLock { $0 = found }
    }

    /// Starts the 30 s refresh (once per process).
    public func startRefreshing() {
        guard started.withLock({ s -> Bool in defer { s = true }; return !s }) else { return }
        let box = Unmanaged.passRetained(self).toOpaque()
        var thread = pthread_t()
        pthread_create(&thread, nil, { raw in
            let me = Unmanaged<HostAddresses>.fromOpaque(raw!).takeRetainedValue()
            while true {
                var t = timespec(tv_sec: 30, tv_nsec: 0)
                nanosleep(&t, nil)
                me.refresh()
            }
        }, box)
        pthread_detach(thread)
    }
}
