import IgrisEngine
@testable import IgrisNegotiation
import Testing

@Suite struct ResolverTests {
    @Test("answers are cached (positive TTL), failures too (negative TTL); ports are the caller's")
    func caches() {
        let resolver = Resolver(positiveTTLNanoseconds: 60_000_000_000, negativeTTLNanoseconds: 60_000_000_000)
        let first = resolver.resolve("localhost", port: 80)
        let second = resolver.resolve("LOCALHOST", port: 8080)
        #expect((try? first.get())?.first?.port == 80)
        #expect((try? second.get())?.first?.port == 8080)
        #expect((try? second.get())?.contains { $0.description.hasPrefix("127.0.0.1:") } == true)
        #expect(resolver.lookups == 1 && resolver.cacheHits == 1)
        #expect(resolver.resolve("no-such-host.invalid", port: 1) == .failure(.notFound))
        #expect(resolver.resolve("no-such-host.invalid", port: 2) == .failure(.notFound))
        #expect(resolver.lookups == 2 && resolver.cacheHits == 2)
    }

    @Test("an expired answer is looked up again")
    func expires() {
        let resolver = Resolver(positiveTTLNanoseconds: 1, negativeTTLNanoseconds: 1)
        _ = resolver.resolve("localhost", port: 1)
        _ = resolver.resolve("localhost", port: 1)
        #expect(resolver.lookups == 2 && resolver.cacheHits == 0)
    }
}
