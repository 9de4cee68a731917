/*
 * corral-init: PID 1 of a Corral sandbox.
 *
 * It is exec'd by the sandbox's first process once every namespace, mount, cgroup and
 * seccomp filter is in place. Its only jobs are the ones the kernel gives PID 1: reap
 * every orphan re-parented to it, and keep the PID namespace (and with it the sandbox)
 * alive until the runtime kills it. When PID 1 dies the kernel SIGKILLs every process
 * in the namespace, which is how a sandbox is torn down.
 *
 * It opens no files, runs no other program and holds no descriptors, so it offers
 * nothing to a process that manages to reach it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

int main(void)
{
    sigset_t all;

    /* Not dumpable: /proc/1 stays owned by the host's root, out of the sandbox's reach. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    /* Every signal is taken synchronously; PID 1 has no default actions anyway. */
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);

    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&all, &info);
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            _exit(111);
        }
        if (sig == SIGCHLD) {
            while (waitpid(-1, NULL, WNOHANG) > 0)
                ;
        } else if (sig == SIGTERM || sig == SIGINT || sig == SIGHUP) {
            /* A polite stop from the runtime: end everything in the namespace, then leave. */
            if (info.si_pid == 0) /* sent from outside the namespace */
                _exit(0);
        }
    }
}
