import Foundation
import Glibc
import IgrisEngine
import Testing

/// `busy_poll`: a worker that just handled completions looks for the next one before it
/// sleeps. A ping-pong's reply comes while it looks, so polls find completions; bytes and
/// close behave as without it.
@Suite("Busy polling", .serialized)
struct BusyPollTests {
    @Test("ping-pong through a busy-polling gateway: replies intact, polls that find completions, the bridge closes",
          arguments: engineBackends)
    func pingPong(backend: BackendChoice) throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        // Generous, so that each reply comes within the poll however loaded the machine is.
        let gateway = try Gateway(backend: backend, upstream: upstream.address) { $0.busyPollNanoseconds = 1_000_000_000 }
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        client.setReceiveTimeout(seconds: 30)
        var pattern = PatternStream(seed: 7)
        for i in 0..<200 {
            var request = [UInt8](repeating: 0, count: 64)
            request.withUnsafeMutableBytes { pattern.fill($0) }
            #expect(client.write(request))
            let reply = try client.readExactly(64)
            #expect(reply == request, "round trip \(i)")
            if reply != request { break }
        }
        client.close()
        #expect(gateway.eventually { gateway.active == 0 }, "the bridge closed")
        let polls = gateway.server.total(.busyPolls)
        let hits = gateway.server.total(.busyPollHits)
        #expect(hits > 0, "polls that found a completion: \(hits) of \(polls)")
        #expect(polls >= hits)
    }

    @Test("no busy_poll: the worker never polls")
    func offByDefault() throws {
        let upstream = try echoUpstream()
        defer { upstream.stop() }
        let gateway = try Gateway(backend: .auto, upstream: upstream.address)
        defer { gateway.stop() }
        let client = try TestSocket.connect(gateway.address)
        client.setReceiveTimeout(seconds: 30)
        #expect(client.write([1, 2, 3]))
        #expect(try client.readExactly(3) == [1, 2, 3])
        client.close()
        #expect(gateway.eventually { gateway.active == 0 })
        #expect(gateway.server.total(.busyPolls) == 0)
    }
}
