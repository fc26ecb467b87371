import Glibc
import CLinux

/// A plain pthread for a worker (the loop blocks in the kernel, so it must not run on a
/// Swift concurrency or Dispatch thread).
public enum WorkerThread {
    private final class Body {
        let run: @Sendable () -> Void
        let name: String
        init(_ run: @escaping @Sendable () -> Void, name: String) { self.run = run; self.name = name }
    }

    public static func spawn(name: String, _ body: @escaping @Sendable () -> Void) -> pthread_t {
        var thread = pthread_t()
        let context = Unmanaged.passRetained(Body(body, name: name)).toOpaque()
        let rc = pthread_create(&thread, nil, { raw in
            let body = Unmanaged<Body>.fromOpaque(raw!).takeRetainedValue()
            igris_set_thread_name(String(body.name.prefix(15)))
            body.run()
            return nil
        }, context)
        precondition(rc == 0, "pthread_create failed: \(Errno.describe(rc))")
        return thread
    }

    /// A detached thread for a control-plane chore that blocks (the hand-off socket).
    public static func detach(name: String, _ body: @escaping @Sendable () -> Void) {
        pthread_detach(spawn(name: name, body))
    }
}
