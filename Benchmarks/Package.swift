// swift-tools-version: 6.1
import PackageDescription

// Microbenchmarks (ordo-one/benchmark), kept out of the main package so `make test` never
// builds the benchmark framework; this package depends on the main one by path, as
// swift-nio's Benchmarks/ does. Run with `make microbench`.
let package = Package(
    name: "IgrisBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "igris", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "EngineBenchmarks",
            dependencies: [
                .product(name: "IgrisEngine", package: "igris"),
                .product(name: "IgrisProtocols", package: "igris"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/EngineBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
