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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#define STATUS_FD 3

static void report(int32_t pid, int32_t status)
{
    int32_t record[2] = {pid, status};
    const char *p = (const char *)record;
    size_t left = sizeof record;
    while (left > 0) {
        ssize_t n = write(STATUS_FD, p, left);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return; /* EPIPE: the runtime is gone; EBADF: nobody asked */
        }
        p += n;
        left -= (size_t)n;
    }
}

int main(void)
{
    sigset_t all;

    /* Not dumpable: /proc/1 stays owned by the host's root, out of the sandbox's reach. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    /* Every signal is taken synchronously; PID 1 has no default actions anyway. */
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);

    for (;;) {
        /* Reap first, then wait: a command can end before the mask above is in place
           (the runtime starts commands as soon as this program is exec'd), and a
           SIGCHLD that arrives unblocked is discarded, never queued. */
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
            report((int32_t)pid, (int32_t)status);

        siginfo_t info;
        int sig = sigwaitinfo(&all, &info);
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            _exit(111);
        }
        if (sig == SIGCHLD) {
            continue; /* reaped at the top of the loop */
        } else if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP) {
            /* A polite stop from the runtime: end everything in the namespace, then leave. */
            if (info.si_pid == 0) /* sent from outside the namespace */
                _exit(0);
        }
    }
}
