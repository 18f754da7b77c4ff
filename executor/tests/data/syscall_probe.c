/* A static probe for the sandbox tests: makes syscalls busybox cannot and
 * prints "<name> ok" or "<name> errno=<n>" for each. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_DESCRIBE 6
#define KEYCTL_SEARCH 10
#define KEYCTL_READ 11
#define KEY_SPEC_SESSION_KEYRING -3
#define KEY_SPEC_USER_KEYRING -4

static void report(const char *name, long r) {
    if (r < 0)
        printf("%s errno=%d\n", name, errno);
    else
        printf("%s ok\n", name);
}

int main(int argc, char **argv) {
    const char *secret = argc > 1 ? argv[1] : "kiln-probe-none";
    char buf[256];
    long r;

    /* The host root user's keyring: find the test's key and read it. */
    r = syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", secret, 0);
    if (r >= 0) {
        long n = syscall(SYS_keyctl, KEYCTL_READ, r, buf, sizeof buf - 1);
        if (n >= 0) {
            buf[n < (long)sizeof buf - 1 ? n : (long)sizeof buf - 1] = 0;
            printf("user-key-payload %s\n", buf);
        }
    }
    report("keyctl-search-user", r);
    r = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0);
    report("keyctl-session", r);
    if (r >= 0) {
        printf("session-id %ld\n", r);
        long n = syscall(SYS_keyctl, KEYCTL_DESCRIBE, r, buf, sizeof buf - 1);
        if (n > 0) {
            buf[sizeof buf - 1] = 0;
            printf("session-describe %s\n", buf);
        }
    }
    report("add_key", syscall(SYS_add_key, "user", "kiln-probe", "x", 1, KEY_SPEC_SESSION_KEYRING));
    report("request_key", syscall(SYS_request_key, "user", "kiln-probe-missing", NULL, 0));

    int fd;
    fd = socket(40 /* AF_VSOCK */, SOCK_STREAM, 0);
    report("socket-vsock", fd);
    if (fd >= 0) close(fd);
    fd = socket(38 /* AF_ALG */, SOCK_SEQPACKET, 0);
    report("socket-alg", fd);
    if (fd >= 0) close(fd);
    fd = socket(17 /* AF_PACKET */, SOCK_RAW, 0);
    report("socket-packet", fd);
    if (fd >= 0) close(fd);
    fd = socket(AF_INET, SOCK_STREAM, 0);
    report("socket-inet", fd);
    if (fd >= 0) close(fd);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    report("socket-unix", fd);
    if (fd >= 0) close(fd);
    fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, 6 /* IPPROTO_TCP */);
    report("socket-inet-raw", fd);
    if (fd >= 0) close(fd);
    fd = socket(AF_INET6, SOCK_RAW, 6 /* IPPROTO_TCP */);
    report("socket-inet6-raw", fd);
    if (fd >= 0) close(fd);
    fd = socket(AF_INET, 10 /* SOCK_PACKET */, 0x0300 /* htons(ETH_P_ALL) */);
    report("socket-inet-packet", fd);
    if (fd >= 0) close(fd);
    fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    report("socket-inet-dgram", fd);
    if (fd >= 0) close(fd);
    fd = socket(16 /* AF_NETLINK */, SOCK_RAW, 0 /* NETLINK_ROUTE */);
    report("socket-netlink-raw", fd);
    if (fd >= 0) close(fd);

    report("unshare-user", unshare(CLONE_NEWUSER));
    report("unshare-net", unshare(CLONE_NEWNET));
    r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    if (r == 0) _exit(0);
    if (r > 0) waitpid((pid_t)r, NULL, 0);
    report("clone-newuser", r);
    r = fork();
    if (r == 0) _exit(0);
    if (r > 0) waitpid((pid_t)r, NULL, 0);
    report("fork", r);
    report("clone3", syscall(SYS_clone3, NULL, 0));
    report("bpf", syscall(SYS_bpf, 0, NULL, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    report("personality-query", personality(0xffffffff));
    report("personality-read-implies-exec", personality(READ_IMPLIES_EXEC));
    /* Flushes on a descriptor that is not open: EBADF (9) when run, 0 when
     * answered without running. */
    report("fsync-badfd", syscall(SYS_fsync, -1));
    report("fdatasync-badfd", syscall(SYS_fdatasync, -1));
    report("syncfs-badfd", syscall(SYS_syncfs, -1));
    report("sync_file_range-badfd", syscall(SYS_sync_file_range, -1, 0, 0, 0));
    return 0;
}
