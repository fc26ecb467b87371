// swift-tools-version: 6.1
import PackageDescription

// Release builds of the targets on the data path skip the runtime exclusivity checks: a
// worker's state lives in classes, and checking every access to it was a fifth of igris's
// own instructions per connection (Benchmarks/instructions.py). Debug builds, which the
// tests run, keep the checks.
let dataPathSettings: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]

// Heavy, benchmark-only dependencies live in Benchmarks/Package.swift (as swift-nio does),
// so a first `make test` on two cores builds only what the gateway needs.
let package = Package(
    name: "igris",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "igris", targets: ["igris"]),
        .executable(name: "igris-load", targets: ["igris-load"]),
        .executable(name: "igris-allocations", targets: ["igris-allocations"]),
        .library(name: "IgrisEngine", targets: ["IgrisEngine"]),
        .library(name: "IgrisProtocols", targets: ["IgrisProtocols"]),
        .library(name: "IgrisPolicy", targets: ["IgrisPolicy"]),
        .library(name: "IgrisNegotiation", targets: ["IgrisNegotiation"]),
        .library(name: "IgrisOperations", targets: ["IgrisOperations"]),
        .library(name: "IgrisTLS", targets: ["IgrisTLS"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        // liburing glue (io_uring only); CLinux: the other Linux calls Swift can't make as is.
        .systemLibrary(name: "CURing"),
        .target(name: "CLinux"),
        .systemLibrary(name: "CSodium", pkgConfig: "libsodium"),
        // OpenSSL 3 (Debian's libssl-dev): the headers plus what Swift can't call as is.
        .target(
            name: "COpenSSL",
            linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]
        ),
        // TLS through memory: contexts from certificate files, sessions the engine feeds and
        // drains with its own recv and send.
        .target(name: "IgrisTLS", dependencies: ["COpenSSL"], swiftSettings: dataPathSettings),
        // Pure byte-level codecs, no I/O: SOCKS5, HTTP/1.1 request heads.
        .target(name: "IgrisProtocols"),
        // Who may go where: users (argon2id via libsodium), rate limits, destination ACL.
        // Plain data and atomics the workers consult inline, so it sits below the engine.
        .target(
            name: "IgrisPolicy",
            dependencies: ["CSodium", .product(name: "Yams", package: "Yams")]
        ),
        .target(
            name: "IgrisEngine",
            dependencies: [
                "CURing",
                "CLinux",
                "IgrisProtocols",
                "IgrisPolicy",
                "IgrisTLS",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: dataPathSettings
        ),
        // What a SOCKS5 / HTTP CONNECT client or a balancer's PROXY header negotiates before
        // the engine connects: the negotiators, the resolver, the offload threads.
        .target(
            name: "IgrisNegotiation",
            dependencies: [
                "IgrisEngine", "IgrisPolicy", "IgrisProtocols",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Running it: the configuration file, the admin endpoint (metrics, health), logfmt.
        .target(
            name: "IgrisOperations",
            dependencies: [
                "IgrisEngine", "IgrisNegotiation", "IgrisPolicy", "IgrisProtocols", "IgrisTLS",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Yams", package: "Yams"),
                        ],
            swiftSettings: dataPathSettings
        ),
        .executableTarget(
            name: "igris",
            dependencies: [
                "IgrisEngine",
                "IgrisNegotiation",
                "IgrisOperations",
                "IgrisPolicy",
                "IgrisTLS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "igris-load",
            dependencies: [
                "CLinux",
                "IgrisEngine",
                "IgrisTLS",
                "IgrisPolicy",
                "IgrisProtocols",
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Counts mallocs while a gateway forwards; `make test` runs its release build.
        .executableTarget(
            name: "igris-allocations",
            dependencies: ["IgrisEngine", "CMallocCounter"]
        ),
        .testTarget(
            name: "IgrisEngineTests",
            dependencies: ["IgrisEngine", "CLinux", .product(name: "Logging", package: "swift-log")]
        ),
        .testTarget(
            name: "IgrisNegotiationTests",
            dependencies: ["IgrisNegotiation", "IgrisEngine", "IgrisPolicy", "IgrisProtocols"]
        ),
        .testTarget(
            name: "IgrisProtocolsTests",
            dependencies: ["IgrisProtocols"]
        ),
        .testTarget(
            name: "IgrisTLSTests",
            dependencies: ["IgrisTLS", "COpenSSL", "CMallocCounter"]
        ),
        .testTarget(
            name: "IgrisPolicyTests",
            dependencies: ["IgrisPolicy"]
        ),
        // Counts allocations process-wide (the test executable interposes malloc), for the
        // "steady-state forwarding allocates nothing" test.
        .target(name: "CMallocCounter", path: "Tests/CMallocCounter"),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["IgrisEngine", "IgrisNegotiation", "IgrisOperations", "IgrisPolicy", "IgrisProtocols", "IgrisTLS", "CSodium", "igris", "igris-load"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
