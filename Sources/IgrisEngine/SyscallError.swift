import Glibc
import CLinux

/// A failed system call: which operation, and the errno it left.
///
/// Every syscall wrapper in IGRIS throws this (typed), so callers see the operation name
/// and `errno` together, and `description` is one line suitable for an operator.
public struct SyscallError: Error, CustomStringConvertible, Sendable, Equatable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation): \(Errno.describe(errno))" }
}

public enum Errno {
    /// strerror text for an errno value (thread-safe strerror_r variant).
    public static func describe(_ code: Int32) -> String {
        var buffer = [CChar](repeating: 0, count: 128)
        // Swift's Glibc module exposes the XSI strerror_r (returns 0 and fills `buffer`).
        let rc = buffer.withUnsafeMutableBufferPointer { strerror_r(code, $0.baseAddress!, $0.count) }
        if rc != 0 { return "errno \(code)" }
        return buffer.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }
}
