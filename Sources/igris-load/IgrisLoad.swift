import ArgumentParser
import Glibc
import IgrisEngine

@main
struct IgrisLoad: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "igris-load",
        abstract: "Load generator and test servers for IGRIS (loopback and test namespaces only).",
        subcommands: [EchoServer.self, Bulk.self, PingPong.self, Hold.self, Churn.self, Busy.self, Slow.self, OpenLoop.self,
                      UDPEchoServer.self, UDPClients.self, HTTPOrigin.self, HTTPClients.self]
    )
}
