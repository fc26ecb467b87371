// The CLinux helpers that need _GNU_SOURCE or headers Swift's Glibc module lacks.
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/socket.h>
#include <stdint.h>
#include <linux/sock_diag.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <string.h>
#include <stdlib.h>
#include <sys/un.h>
#include "CLinux.h"

long igris_send_with_fd(int sock, const void *buf, size_t len, int fd) {
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union { struct cmsghdr h; char space[CMSG_SPACE(sizeof(int))]; } control;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (fd >= 0) {
        memset(&control, 0, sizeof control);
        m.msg_control = control.space;
        m.msg_controllen = sizeof control.space;
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    return (long)sendmsg(sock, &m, MSG_NOSIGNAL);
}

long igris_recv_with_fd(int sock, void *buf, size_t len, int *fd) {
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    union { struct cmsghdr h; char space[CMSG_SPACE(sizeof(int) * 4)]; } control;
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space, .msg_controllen = sizeof control.space};
    *fd = -1;
    long n = (long)recvmsg(sock, &m, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int received[4];
        memcpy(received, CMSG_DATA(c), count * sizeof(int));
        // One descriptor per message is the protocol: anything more is closed, never leaked.
        for (size_t i = 0; i < count; i++) {
            if (*fd < 0) *fd = received[i]; else close(received[i]);
        }
    }
    return n;
}

int igris_peer_credentials(int fd, int *pid, unsigned *uid) {
    struct ucred c;
    socklen_t n = sizeof c;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &c, &n) != 0) return -errno;
    *pid = c.pid;
    *uid = c.uid;
    return 0;
}

int igris_notify(const char *path, const char *text) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof a.sun_path) return -EINVAL;
    memcpy(a.sun_path, path, n);
    if (path[0] == '@') a.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    long r = sendto(fd, text, strlen(text), MSG_NOSIGNAL, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n));
    int e = errno;
    close(fd);
    return r < 0 ? -e : 0;
}

int igris_unix_seqpacket(const char *path, int listen_) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) return -ENAMETOOLONG;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int r = listen_ ? bind(fd, (struct sockaddr *)&a, sizeof a) : connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r == 0 && listen_) r = listen(fd, 4);
    if (r != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int igris_kernel_release(char *out, size_t size) {
    struct utsname u;
    if (uname(&u) != 0 || size == 0) return -1;
    size_t i = 0;
    for (; i + 1 < size && u.release[i]; i++) out[i] = u.release[i];
    out[i] = 0;
    return 0;
}

void igris_set_thread_name(const char *name) {
    pthread_setname_np(pthread_self(), name);
}

int igris_accept4(int fd, int flags) {
    return accept4(fd, NULL, NULL, flags);
}

long igris_splice(int fd_in, int fd_out, size_t len) {
    return (long)splice(fd_in, NULL, fd_out, NULL, len, igris_splice_flags());
}

int igris_make_pipe(int fds[2], int *size) {
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) return -errno;
    int granted = fcntl(fds[0], F_SETPIPE_SZ, *size);
    if (granted < 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        return -e;
    }
    *size = granted;
    return 0;
}

long igris_send_room(int fd, long *size, long *queued) {
    uint32_t info[SK_MEMINFO_VARS];
    socklen_t length = sizeof info;
    if (getsockopt(fd, SOL_SOCKET, SO_MEMINFO, info, &length) != 0) return -1;
    *size = (long)info[SK_MEMINFO_SNDBUF];
    *queued = (long)info[SK_MEMINFO_WMEM_QUEUED];
    long free = (long)info[SK_MEMINFO_SNDBUF] - (long)info[SK_MEMINFO_WMEM_QUEUED];
    long room = free - free / 4 - 4096;
    return room > 0 ? room : 0;
}

struct igris_dgram_batch {
    unsigned slots;
    size_t slot_size, headroom;
    unsigned char *buffers;
    struct mmsghdr *in;
    struct iovec *in_iov;
    struct sockaddr_storage *senders;
    struct mmsghdr *out;
    struct iovec *out_iov;
    struct sockaddr_storage *targets;
    unsigned queued;
};

struct igris_dgram_batch *igris_dgram_batch_create(unsigned slots, size_t slot_size, size_t headroom) {
    struct igris_dgram_batch *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->slots = slots;
    b->slot_size = slot_size;
    b->headroom = headroom;
    b->buffers = malloc((size_t)slots * slot_size + 1);  /* +1: a send-only batch has none */
    b->in = calloc(slots, sizeof *b->in);
    b->in_iov = calloc(slots, sizeof *b->in_iov);
    b->senders = calloc(slots, sizeof *b->senders);
    b->out = calloc(slots, sizeof *b->out);
    b->out_iov = calloc(slots, sizeof *b->out_iov);
    b->targets = calloc(slots, sizeof *b->targets);
    if (!b->buffers || !b->in || !b->in_iov || !b->senders || !b->out || !b->out_iov || !b->targets) {
        igris_dgram_batch_free(b);
        return NULL;
    }
    return b;
}

void igris_dgram_batch_free(struct igris_dgram_batch *b) {
    if (!b) return;
    free(b->buffers); free(b->in); free(b->in_iov); free(b->senders); free(b->out); free(b->out_iov); free(b->targets);
    free(b);
}

int igris_dgram_receive(int fd, struct igris_dgram_batch *b) {
    for (unsigned i = 0; i < b->slots; i++) {
        b->in_iov[i].iov_base = b->buffers + (size_t)i * b->slot_size + b->headroom;
        b->in_iov[i].iov_len = b->slot_size - b->headroom;
        memset(&b->in[i].msg_hdr, 0, sizeof b->in[i].msg_hdr);
        b->in[i].msg_hdr.msg_iov = &b->in_iov[i];
        b->in[i].msg_hdr.msg_iovlen = 1;
        b->in[i].msg_hdr.msg_name = &b->senders[i];
        b->in[i].msg_hdr.msg_namelen = sizeof b->senders[i];
        b->in[i].msg_len = 0;
    }
    int n;
    do { n = recvmmsg(fd, b->in, b->slots, MSG_DONTWAIT, NULL); } while (n < 0 && errno == EINTR);
    return n;
}

unsigned char *igris_dgram_slot(struct igris_dgram_batch *b, unsigned i) { return b->buffers + (size_t)i * b->slot_size; }
size_t igris_dgram_length(struct igris_dgram_batch *b, unsigned i) { return b->in[i].msg_len; }
int igris_dgram_truncated(struct igris_dgram_batch *b, unsigned i) { return (b->in[i].msg_hdr.msg_flags & MSG_TRUNC) != 0; }

const struct sockaddr *igris_dgram_sender(struct igris_dgram_batch *b, unsigned i, socklen_t *length) {
    *length = b->in[i].msg_hdr.msg_namelen;
    return (const struct sockaddr *)&b->senders[i];
}

void igris_dgram_queue(struct igris_dgram_batch *b, unsigned i, size_t offset, size_t length, const struct sockaddr *to, socklen_t to_length) {
    igris_dgram_queue_bytes(b, igris_dgram_slot(b, i) + offset, length, to, to_length);
}

void igris_dgram_queue_bytes(struct igris_dgram_batch *b, void *data, size_t length, const struct sockaddr *to, socklen_t to_length) {
    unsigned k = b->queued;
    if (k >= b->slots || to_length > sizeof b->targets[k]) return;
    b->out_iov[k].iov_base = data;
    b->out_iov[k].iov_len = length;
    memcpy(&b->targets[k], to, to_length);
    memset(&b->out[k].msg_hdr, 0, sizeof b->out[k].msg_hdr);
    b->out[k].msg_hdr.msg_iov = &b->out_iov[k];
    b->out[k].msg_hdr.msg_iovlen = 1;
    b->out[k].msg_hdr.msg_name = &b->targets[k];
    b->out[k].msg_hdr.msg_namelen = to_length;
    b->queued = k + 1;
}

int igris_dgram_send(int fd, struct igris_dgram_batch *b, long *bytes) {
    *bytes = 0;
    unsigned total = b->queued;
    b->queued = 0;
    if (total == 0) return 0;
    int n;
    do { n = sendmmsg(fd, b->out, total, MSG_DONTWAIT | MSG_NOSIGNAL); } while (n < 0 && errno == EINTR);
    for (int i = 0; i < n; i++) *bytes += (long)b->out[i].msg_len;
    return n;
}

unsigned igris_dgram_queued(struct igris_dgram_batch *b) { return b->queued; }

pid_t igris_thread_id(void) { return (pid_t)syscall(SYS_gettid); }
