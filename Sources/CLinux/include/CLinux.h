// CLinux: the Linux calls Swift's Glibc module cannot reach as they are — functions that
// need _GNU_SOURCE, variadic ones, errno as a plain read — and the epoll/eventfd headers.
#ifndef IGRIS_CLINUX_H
#define IGRIS_CLINUX_H

#include <sys/types.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>

/// The calling thread's kernel id (what /proc/self/task/<tid> names).
pid_t igris_thread_id(void);

/// errno as an lvalue-free read, for the Swift syscall wrappers.
static inline int igris_errno(void) { return errno; }

/// accept4 without a peer address (Swift can't pass NULL for glibc's transparent union);
/// the fd, or -1 with errno set.
int igris_accept4(int fd, int flags);

/// splice(2) between a socket and a pipe with SPLICE_F_NONBLOCK|SPLICE_F_MOVE: bytes moved,
/// or -1 with errno set.
long igris_splice(int fd_in, int fd_out, size_t len);

/// The SPLICE_F_* flags IGRIS uses for splices (io_uring's too).
static inline unsigned igris_splice_flags(void) { return 2u /* SPLICE_F_NONBLOCK */ | 1u /* SPLICE_F_MOVE */; }

/// Bytes a socket's send buffer takes now without blocking, at least: SO_MEMINFO's send
/// buffer size less what is queued, both as the kernel accounts them (skb overhead included),
/// less a quarter and 4 KiB for the overhead the new bytes bring (a window that closes
/// splits skbs). 0 when full; -1 with errno set when the socket cannot say. `size` receives
/// the send buffer's size, `queued` what is in it.
long igris_send_room(int fd, long *size, long *queued);

/// A non-blocking close-on-exec pipe sized with F_SETPIPE_SZ; 0, or -errno of the step that
/// failed (the pipe is closed then). `size` is updated to the size the kernel granted.
int igris_make_pipe(int fds[2], int *size);

/// open(2) for reading (the variadic form is not callable from Swift).
static inline int igris_open_read(const char *path) { return open(path, O_RDONLY | O_CLOEXEC); }

/// uname(2)'s release string, e.g. "6.18.44" (<sys/utsname.h> clashes with Glibc's module).
int igris_kernel_release(char *out, size_t size);

/// Names the calling thread (pthread_setname_np needs _GNU_SOURCE).
void igris_set_thread_name(const char *name);

/// sendmsg(2) of `len` bytes with `fd` attached (SCM_RIGHTS; fd < 0: none), MSG_NOSIGNAL:
/// bytes sent, or -1 with errno set.
long igris_send_with_fd(int sock, const void *buf, size_t len, int fd);

/// recvmsg(2) into `buf`, MSG_CMSG_CLOEXEC: bytes received (0 at end of stream), or -1 with
/// errno set. `*fd` receives the attached descriptor, or -1 when none came.
long igris_recv_with_fd(int sock, void *buf, size_t len, int *fd);

/// A SOCK_SEQPACKET unix socket bound to (listen) or connected to (!listen) `path`; the
/// fd, or -errno (-ENAMETOOLONG for a path sockaddr_un can't hold).
int igris_unix_seqpacket(const char *path, int listen);

/// SO_PEERCRED of a unix socket: 0 with `pid` and `uid` set, or -errno.
int igris_peer_credentials(int fd, int *pid, unsigned *uid);

/// sd_notify(3): sends `text` to the datagram socket `path` (NOTIFY_SOCKET; a leading '@'
/// is the abstract namespace). 0, or -errno.
int igris_notify(const char *path, const char *text);

/// A batch of datagrams for recvmmsg/sendmmsg (Swift's Glibc has no mmsghdr): `slots`
/// buffers of `slot_size` bytes, each read at `headroom` (room to write a header before the
/// data), with its length and sender; and a queue of messages to send from those buffers.
struct igris_dgram_batch;
struct igris_dgram_batch *igris_dgram_batch_create(unsigned slots, size_t slot_size, size_t headroom);
void igris_dgram_batch_free(struct igris_dgram_batch *b);
/// recvmmsg(MSG_DONTWAIT) into every slot: datagrams received, or -1 with errno set.
int igris_dgram_receive(int fd, struct igris_dgram_batch *b);
/// Slot i's buffer (its headroom first).
unsigned char *igris_dgram_slot(struct igris_dgram_batch *b, unsigned i);
/// The length and sender of the datagram received in slot i (truncated ones are marked so).
size_t igris_dgram_length(struct igris_dgram_batch *b, unsigned i);
int igris_dgram_truncated(struct igris_dgram_batch *b, unsigned i);
const struct sockaddr *igris_dgram_sender(struct igris_dgram_batch *b, unsigned i, socklen_t *length);
/// Queues bytes [offset, offset + length) of slot i for `to`.
void igris_dgram_queue(struct igris_dgram_batch *b, unsigned i, size_t offset, size_t length, const struct sockaddr *to, socklen_t to_length);
/// sendmmsg(MSG_DONTWAIT) of the queue, which it empties: messages sent (the first ones), or
/// -1 with errno set when none could be; `bytes` receives their payload bytes.
int igris_dgram_send(int fd, struct igris_dgram_batch *b, long *bytes);
unsigned igris_dgram_queued(struct igris_dgram_batch *b);
/// Queues `length` bytes at `data` (memory the caller keeps until the send) for `to`.
void igris_dgram_queue_bytes(struct igris_dgram_batch *b, void *data, size_t length, const struct sockaddr *to, socklen_t to_length);

#endif
