import Glibc

/// Unbuffered writes to a standard descriptor (print() buffers stdout, which hides lines
/// from a supervisor until exit).
struct FileDescriptorOutput {
    let fd: Int32
    static let standardError = FileDescriptorOutput(fd: 2)
    static let standardOutput = FileDescriptorOutput(fd: 1)

    func write(_ text: String) {
        var text = text
        text.withUTF8 { bytes in
            var offset = 0
            while offset < bytes.count {
                let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                if n <= 0 { return }
                offset += n
            }
        }
    }
}
