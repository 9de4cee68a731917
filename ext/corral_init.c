/*
 * corral-init: PID 1 of a Corral sandbox.
 *
 * It is exec'd by the sandbox's first process once every namespace, mount, cgroup and
 * seccomp filter is in place. Its jobs are the ones the kernel gives PID 1: reap every
 * process re-parented to it, and keep the PID namespace (and with it the sandbox) alive
 * until the runtime kills it. When PID 1 dies the kernel SIGKILLs every process in the
 * namespace, which is how a sandbox is torn down.
 *
 * Every command the runtime starts in the sandbox becomes a child of PID 1 (its launcher
 * exits at once), so PID 1 also tells the runtime how each one ended: for every process
 * it reaps it writes one record, {int32 pid in the namespace, int32 wait status}, to
 * descriptor 3, the write end of a pipe the runtime reads. Commands are thus reaped
 * inside the sandbox even when the runtime is gone.
 *
 * It opens no files, runs no other program and holds no descriptor but that pipe, so it
 * offers nothing to a process that manages to reach it.
 *
 * Built without a C library where the build knows the machine (CORRAL_INIT_FREESTANDING:
 * x86-64 and arm64; setup.py falls back to a static libc build elsewhere). It needs six
 * system calls, and a static glibc's start-up alone cost about 0.5 ms of every sandbox
 * start on a VM: it asks the CPU for its cache sizes with dozens of CPUID instructions,
 * each a trap to the hypervisor (bench/README.md, spawn).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define STATUS_FD 3

#ifdef CORRAL_INIT_FREESTANDING

#include <errno.h> /* the E* numbers only: there is no errno variable here */

/* The kernel's sigset_t (one bit per signal, 64 of them) and siginfo_t (128 bytes; the
   sender's pid follows signo, errno, code and padding to 8 bytes on 64-bit machines). */
typedef uint64_t ksigset_t;
typedef struct {
    int32_t signo, err, code, pad;
    int32_t pid;
    int32_t rest[27];
} ksiginfo_t;

#if defined(__x86_64__)
static long sys(long n, long a, long b, long c, long d)
{
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}
/* The kernel enters with the stack 16-byte aligned and argc at its top; main takes none. */
__asm__(".text\n.global _start\n_start:\n"
        "  xor %ebp, %ebp\n  and $-16, %rsp\n  call init_main\n  hlt\n");
#elif defined(__aarch64__)
static long sys(long n, long a, long b, long c, long d)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
}
__asm__(".text\n.global _start\n_start:\n"
        "  mov x29, #0\n  mov x30, #0\n  bl init_main\n  brk #0\n");
#else
#error "no freestanding corral-init for this machine: build without CORRAL_INIT_FREESTANDING"
#endif

/* Each returns what the system call does: a result, or -errno. */
static long write_fd(int fd, const void *p, unsigned long n)
{
    return sys(__NR_write, fd, (long)p, (long)n, 0);
}
static long reap(int *status) { return sys(__NR_wait4, -1, (long)status, WNOHANG, 0); }
static long block_all(ksigset_t *all)
{
    return sys(__NR_rt_sigprocmask, SIG_BLOCK, (long)all, 0, sizeof *all);
}
static long wait_signal(ksigset_t *all, ksiginfo_t *info)
{
    return sys(__NR_rt_sigtimedwait, (long)all, (long)info, 0, sizeof *all);
}
static void not_dumpable(void) { sys(__NR_prctl, PR_SET_DUMPABLE, 0, 0, 0); }
static __attribute__((noreturn)) void leave(int code)
{
    for (;;)
        sys(__NR_exit_group, code, 0, 0, 0);
}
#define ERR(ret) ((ret) < 0 && (ret) > -4096 ? (int)-(ret) : 0)
#define SENDER(info) ((info).pid)

#else /* with the C library */

#include <errno.h>
#include <unistd.h>

typedef sigset_t ksigset_t;
typedef siginfo_t ksiginfo_t;
#define SENDER(info) ((info).si_pid)

static long write_fd(int fd, const void *p, unsigned long n)
{
    long ret = write(fd, p, n);
    return ret < 0 ? -errno : ret;
}
static long reap(int *status)
{
    long ret = waitpid(-1, status, WNOHANG);
    return ret < 0 ? -errno : ret;
}
static long block_all(ksigset_t *all)
{
    sigfillset(all);
    return sigprocmask(SIG_BLOCK, all, NULL) < 0 ? -errno : 0;
}
static long wait_signal(ksigset_t *all, ksiginfo_t *info)
{
    long ret = sigwaitinfo(all, info);
    return ret < 0 ? -errno : ret;
}
static void not_dumpable(void) { prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); }
static __attribute__((noreturn)) void leave(int code) { _exit(code); }
#define ERR(ret) ((ret) < 0 ? (int)-(ret) : 0)

#endif

static void report(int32_t pid, int32_t status)
{
    int32_t record[2] = {pid, status};
    const char *p = (const char *)record;
    unsigned long left = sizeof record;
    while (left > 0) {
        long n = write_fd(STATUS_FD, p, left);
        if (n < 0) {
            if (ERR(n) == EINTR)
                continue;
            return; /* EPIPE: the runtime is gone; EBADF: nobody asked */
        }
        p += n;
        left -= (unsigned long)n;
    }
}

__attribute__((noreturn)) void init_main(void)
{
    ksigset_t all;

    /* Not dumpable: /proc/1 stays owned by the host's root, out of the sandbox's reach. */
    not_dumpable();

    /* Every signal is taken synchronously; PID 1 has no default actions anyway. */
#ifdef CORRAL_INIT_FREESTANDING
    all = ~(ksigset_t)0;
#endif
    block_all(&all);

    for (;;) {
        /* Reap first, then wait: a command can end before the mask above is in place
           (the runtime starts commands as soon as this program is exec'd), and a
           SIGCHLD that arrives unblocked is discarded, never queued. */
        int status;
        long pid;
        while ((pid = reap(&status)) > 0)
            report((int32_t)pid, (int32_t)status);

        ksiginfo_t info;
        long sig = wait_signal(&all, &info);
        if (sig < 0) {
            if (ERR(sig) == EINTR)
                continue;
            leave(111);
        }
        if (sig == SIGCHLD) {
            continue; /* reaped at the top of the loop */
        } else if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP) {
            /* A polite stop from the runtime: end everything in the namespace, then leave. */
            if (SENDER(info) == 0) /* sent from outside the namespace */
                leave(0);
        }
    }
}

#ifndef CORRAL_INIT_FREESTANDING
int main(void) { init_main(); }
#endif
