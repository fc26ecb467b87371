// The few CURing helpers that need headers or feature macros Swift's Glibc module lacks;
// the rest is static inline in include/CURing.h so Swift inlines it.
#define _GNU_SOURCE
#include <pthread.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include "CURing.h"

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
