// swift-tools-version: 6.1
import PackageDescription

// libFuzzer targets for the parsers that face the network and the operator: SOCKS5, HTTP
// request heads, PROXY v1/v2, the configuration and users files. Its own package (like
// Benchmarks/): the targets have no main() of their own — libFuzzer's comes in with
// -sanitize=fuzzer — so they must not be part of the main package's normal build.
// Run with `make fuzz` (see the Makefile for the flags).
let package = Package(
    name: "IgrisFuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "igris", path: ".."),
    ],
    targets: [
        .executableTarget(name: "FuzzSocks5", dependencies: [.product(name: "IgrisProtocols", package: "igris")]),
        .executableTarget(name: "FuzzHTTPHead", dependencies: [.product(name: "IgrisProtocols", package: "igris")]),
        .executableTarget(name: "FuzzProxyProtocol", dependencies: [.product(name: "IgrisProtocols", package: "igris")]),
        .executableTarget(name: "FuzzConfig", dependencies: [
            .product(name: "IgrisEngine", package: "igris"),
            .product(name: "IgrisGateway", package: "igris"),
            .product(name: "IgrisPolicy", package: "igris"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
