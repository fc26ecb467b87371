// swift-tools-version: 6.1
import PackageDescription

// Heavy, benchmark-only dependencies live in Benchmarks/Package.swift (as swift-nio does),
// so a first `make test` on two cores builds only what the gateway needs.
let package = Package(
    name: "igris",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "igris", targets: ["igris"]),
        .executable(name: "igris-load", targets: ["igris-load"]),
        .library(name: "IgrisEngine", targets: ["IgrisEngine"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        .target(
            name: "CURing",
            linkerSettings: [.linkedLibrary("uring")]
        ),
        .systemLibrary(name: "CSodium", pkgConfig: "libsodium"),
        .target(
            name: "IgrisEngine",
            dependencies: [
                "CURing",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "igris",
            dependencies: [
                "IgrisEngine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "igris-load",
            dependencies: [
                "IgrisEngine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "IgrisEngineTests",
            dependencies: ["IgrisEngine"]
        ),
        // Counts allocations process-wide (the test executable interposes malloc), for the
        // "steady-state forwarding allocates nothing" test.
        .target(name: "CMallocCounter", path: "Tests/CMallocCounter"),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["IgrisEngine", "CSodium", "CMallocCounter", "igris", "igris-load"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
