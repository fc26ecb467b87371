// swift-tools-version: 6.1
import PackageDescription

// libFuzzer targets for the parsers that face the network and the operator: SOCKS5 (and its
// UDP datagram header), HTTP
// request heads, PROXY v1/v2, the configuration and users files. Its own package (like
// Benchmarks/), built only with -sanitize=fuzzer: each main() hands its target to
// libFuzzer's LLVMFuzzerRunDriver.
// Run with `make fuzz` (see the Makefile for the flags).
let package = Package(
    name: "IgrisFuzz",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "igris", path: ".."),
    ],
    targets: [
        .target(name: "FuzzDriver"),
        .target(name: "FuzzSupport", dependencies: ["FuzzDriver"]),
        .executableTarget(name: "FuzzSocks5", dependencies: ["FuzzSupport", .product(name: "IgrisProtocols", package: "igris")]),
        .executableTarget(name: "FuzzSocks5UDP", dependencies: ["FuzzSupport", .product(name: "IgrisProtocols", package: "igris")]),
        .executableTarget(name: "FuzzHTTPHead", dependencies: ["FuzzSupport", .product(name: "IgrisProtocols", package: "igris")]),
        .executableTarget(name: "FuzzProxyProtocol", dependencies: ["FuzzSupport", .product(name: "IgrisProtocols", package: "igris")]),
        .executableTarget(name: "FuzzAddress", dependencies: ["FuzzSupport", .product(name: "IgrisPolicy", package: "igris")]),
        .executableTarget(name: "FuzzConfig", dependencies: [
            "FuzzSupport",
            .product(name: "IgrisEngine", package: "igris"),
            .product(name: "IgrisOperations", package: "igris"),
            .product(name: "IgrisPolicy", package: "igris"),
        ]),
    ],
    swiftLanguageModes: [.v6]
)
