/* Test tool run as root inside a guest: takes the agent's virtio-serial port from PID 1
 * (pidfd_getfd) and writes forged frames on it, as a hostile guest would.
 *   forge flood ID BYTES  - Output frames of 'F' for process ID on stdout, BYTES in total
 *   forge big             - a length header far above the frame limit
 *   forge half            - a header for 1000 bytes, 10 of them, then silence
 * Prints nothing while it writes: its own output is forwarded by the agent on the same port,
 * and two writers' frames could interleave. Built with cc -static. */
#define _GNU_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int port_fd(void) {
    DIR *d = opendir("/proc/1/fd");
    if (!d) { perror("opendir /proc/1/fd"); exit(2); }
    int pidfd = syscall(SYS_pidfd_open, 1, 0);
    if (pidfd < 0) { perror("pidfd_open"); exit(2); }
    struct dirent *e;
    char path[64], target[256];
    while ((e = readdir(d))) {
        snprintf(path, sizeof path, "/proc/1/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n <= 0) continue;
        target[n] = 0;
        if (!strstr(target, "vport")) continue;
        int fd = syscall(SYS_pidfd_getfd, pidfd, atoi(e->d_name), 0);
        if (fd < 0) { perror("pidfd_getfd"); exit(2); }
        return fd;
    }
    fprintf(stderr, "no vport fd in /proc/1/fd\n");
    exit(2);
}

static void put(int fd, const unsigned char *buf, size_t len) {
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n <= 0) { perror("write"); exit(3); }
        buf += n;
        len -= n;
    }
}

static size_t varint(unsigned char *p, unsigned long v) {
    size_t i = 0;
    do { p[i] = v & 0x7f; v >>= 7; if (v) p[i] |= 0x80; i++; } while (v);
    return i;
}

int main(int argc, char **argv) {
    if (argc < 2) return 1;
    int fd = port_fd();
    if (!strcmp(argv[1], "flood") && argc == 4) {
        unsigned long id = strtoul(argv[2], 0, 10), total = strtoul(argv[3], 0, 10);
        enum { CHUNK = 32768 };
        static unsigned char frame[CHUNK + 32];
        while (total) {
            unsigned long n = total < CHUNK ? total : CHUNK;
            size_t p = 4;
            frame[p++] = 5; /* GuestMessage::Output */
            p += varint(frame + p, id);
            frame[p++] = 0; /* OutputStream::Stdout */
            p += varint(frame + p, n);
            memset(frame + p, 'F', n);
            p += n;
            unsigned int len = p - 4;
            memcpy(frame, &len, 4);
            put(fd, frame, p);
            total -= n;
        }
        return 0;
    }
    if (!strcmp(argv[1], "big")) {
        unsigned int len = 0x7fffffff;
        put(fd, (unsigned char *)&len, 4);
        pause();
    }
    if (!strcmp(argv[1], "half")) {
        unsigned char buf[14] = {0};
        unsigned int len = 1000;
        memcpy(buf, &len, 4);
        buf[4] = 5;
        put(fd, buf, sizeof buf);
        pause();
    }
    return 1;
}
