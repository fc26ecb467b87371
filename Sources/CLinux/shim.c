// The CLinux helpers that need _GNU_SOURCE or headers Swift's Glibc module lacks.
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/socket.h>
#include <stdint.h>
#include <linux/sock_diag.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/utsname.h>
#include "CLinux.h"

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
