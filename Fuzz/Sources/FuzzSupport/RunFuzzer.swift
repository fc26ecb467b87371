import FuzzDriver
import Glibc

/// The target libFuzzer calls, set once by `runFuzzer` before the fuzzing loop starts.
nonisolated(unsafe) private var currentTarget: ((UnsafePointer<UInt8>, Int) -> Int32)?

/// Each fuzz executable's main: hands `target` to libFuzzer's driver with the command line
/// (corpus folders, -max_total_time, …) and exits with its status.
public func runFuzzer(_ target: @escaping (UnsafePointer<UInt8>, Int) -> Int32) -> Never {
    currentTarget = target
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in
        // libFuzzer passes a null pointer for the empty input.
        currentTarget!(data ?? UnsafePointer(bitPattern: 1)!, size)
    })
}
