// CURing: the thin C layer IGRIS needs over Debian's liburing 2.3.
//
// Swift calls liburing's static-inline io_uring_prep_* helpers directly. This header holds
// only liburing glue Swift cannot reach or liburing 2.3 lacks: flag macros built from enums,
// CQE batch iteration, provided-buffer-ring helpers, SQE fields. Other Linux calls are CLinux's.
#ifndef IGRIS_CURING_H
#define IGRIS_CURING_H

// Only liburing and what the helpers below need; Swift gets the rest of libc from Glibc.
// libc's own headers come first: liburing.h defines _XOPEN_SOURCE/_GNU_SOURCE before its
// includes, which would give this module a different fd_set than every other C module.
#include <sys/types.h>
#include <sys/select.h>
#include <signal.h>
#include <sys/socket.h>
#include <liburing.h>
#include <stddef.h>

/// One completion as IGRIS consumes it: the three fields of a CQE, copied out so the
/// CQ slot can be handed back to the kernel before the completion is processed.
typedef struct igris_completion {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
} igris_completion;

/// Copies up to `max` ready CQEs into `out` and advances the CQ head past them (one
/// store-release for the whole batch). Returns how many were copied.
static inline unsigned igris_uring_take_completions(struct io_uring *ring, igris_completion *out, unsigned max) {
    unsigned head;
    unsigned n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == max) break;
        out[n].user_data = cqe->user_data;
        out[n].res = cqe->res;
        out[n].flags = cqe->flags;
        n++;
    }
    if (n) io_uring_cq_advance(ring, n);
    return n;
}

/// Completions the kernel could not post because the CQ was full (IORING_FEAT_NODROP
/// keeps them and flushes them later); IGRIS counts this so an undersized CQ shows.
static inline unsigned igris_uring_cq_overflow(const struct io_uring *ring) {
    return ring->cq.koverflow ? IO_URING_READ_ONCE(*ring->cq.koverflow) : 0;
}

static inline int igris_uring_sq_cq_overflow_flag(const struct io_uring *ring) {
    return (IO_URING_READ_ONCE(*ring->sq.kflags) & IORING_SQ_CQ_OVERFLOW) != 0;
}

/// recv that picks its buffer from provided-buffer group `group`.
static inline void igris_sqe_select_buffer(struct io_uring_sqe *sqe, uint16_t group) {
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = group;
}

/// A multishot recvmsg that takes each datagram into a buffer of provided-buffer group
/// `group`, laid out as `struct io_uring_recvmsg_out`, the sender (`msg->msg_namelen`
/// bytes), then the payload. `msg` is a template that must outlive the operation.
static inline void igris_prep_recvmsg_multishot(struct io_uring_sqe *sqe, int fd, struct msghdr *msg, uint16_t group) {
    io_uring_prep_recvmsg_multishot(sqe, fd, msg, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = group;
}

/// One datagram of a multishot recvmsg in `buf` (`length` bytes): the offsets of its
/// sender and payload, their lengths and whether it was truncated; 0, or -1 when the
/// buffer does not hold a valid one.
static inline int igris_recvmsg_parse(void *buf, int length, struct msghdr *msg, unsigned *name_offset, unsigned *name_length,
                                      unsigned *payload_offset, unsigned *payload_length, int *truncated) {
    struct io_uring_recvmsg_out *o = io_uring_recvmsg_validate(buf, length, msg);
    if (!o) return -1;
    *name_offset = (unsigned)((unsigned char *)io_uring_recvmsg_name(o) - (unsigned char *)buf);
    *name_length = o->namelen;
    *payload_offset = (unsigned)((unsigned char *)io_uring_recvmsg_payload(o, msg) - (unsigned char *)buf);
    *payload_length = io_uring_recvmsg_payload_length(o, length, msg);
    *truncated = (o->flags & MSG_TRUNC) != 0;
    return 0;
}

static inline uint32_t igris_cqe_flag_buffer(void) { return IORING_CQE_F_BUFFER; }
static inline uint32_t igris_cqe_flag_more(void) { return IORING_CQE_F_MORE; }
static inline uint32_t igris_cqe_flag_notif(void) { return IORING_CQE_F_NOTIF; }
static inline uint32_t igris_cqe_buffer_shift(void) { return IORING_CQE_BUFFER_SHIFT; }

/// Provided buffer ring (liburing 2.3 has no io_uring_setup_buf_ring): the caller mmaps a
/// page-aligned region of `entries` * sizeof(struct io_uring_buf) and registers it here.
static inline int igris_uring_register_buf_ring(struct io_uring *ring, void *ring_memory, unsigned entries, uint16_t group) {
    struct io_uring_buf_reg reg = {0};
    reg.ring_addr = (uint64_t)(uintptr_t)ring_memory;
    reg.ring_entries = entries;
    reg.bgid = group;
    io_uring_buf_ring_init((struct io_uring_buf_ring *)ring_memory);
    return io_uring_register_buf_ring(ring, &reg, 0);
}

static inline size_t igris_buf_ring_entry_size(void) { return sizeof(struct io_uring_buf); }

/// Hands one buffer back to the kernel; visible to it at once.
static inline void igris_buf_ring_recycle(void *ring_memory, unsigned entries, void *addr, unsigned len, uint16_t bid) {
    struct io_uring_buf_ring *br = (struct io_uring_buf_ring *)ring_memory;
    io_uring_buf_ring_add(br, addr, len, bid, io_uring_buf_ring_mask(entries), 0);
    io_uring_buf_ring_advance(br, 1);
}

/// Registers one region as fixed buffer 0 (for IORING_OP_SEND_ZC with IORING_RECVSEND_FIXED_BUF).
static inline int igris_uring_register_region(struct io_uring *ring, void *base, size_t length) {
    struct iovec iov = { .iov_base = base, .iov_len = length };
    return io_uring_register_buffers(ring, &iov, 1);
}

/// Direct descriptors: the operation names an entry of the ring's fixed-file table.
static inline void igris_sqe_fixed_file(struct io_uring_sqe *sqe, int index) {
    sqe->fd = index;
    sqe->flags |= IOSQE_FIXED_FILE;
}

/// Runs the next SQE whatever this one's result (a link that a failure does not break).
static inline void igris_sqe_hardlink(struct io_uring_sqe *sqe) { sqe->flags |= IOSQE_IO_HARDLINK; }

/// setsockopt through the ring (IORING_OP_URING_CMD with SOCKET_URING_OP_SETSOCKOPT,
/// kernel 6.7+), for a socket that has no regular descriptor. These headers predate it:
/// level and optname share `addr`, optlen is `file_index`'s place and optval `addr3`'s.
static inline void igris_prep_setsockopt(struct io_uring_sqe *sqe, int fd, int level, int optname, const void *optval, int optlen) {
    io_uring_prep_rw(IORING_OP_URING_CMD, sqe, fd, NULL, 0, 0);
    sqe->cmd_op = 3; /* SOCKET_URING_OP_SETSOCKOPT */
    sqe->addr = ((uint64_t)(uint32_t)optname << 32) | (uint32_t)level;
    sqe->file_index = (uint32_t)optlen;
    sqe->addr3 = (uint64_t)(uintptr_t)optval;
}

#endif
