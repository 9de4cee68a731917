# cython: language_level=3
"""Process creation for the native sandbox: clone into namespaces, contain, execve.

Everything between clone() and execve() in this module is C compiled from Cython with
the GIL released, calling raw syscalls only: no Python object is touched, nothing is
allocated, no lock is taken. A daemon with gRPC and asyncio threads can therefore spawn
safely (see FIELD-NOTES "Spawning from a multithreaded Python process").

The parent (Python) turns a plan built by ``corral.sandbox.contain`` into a
``ChildPlan``: plain C arrays owned by that object. Two entry points use it:

``spawn_init(plan, ...)``
    clone() with new user/pid/mount/net/uts/ipc namespaces; the child becomes PID 1,
    builds the sandbox (mounts, pivot_root, limits, seccomp) and execs corral-init.
    With ``command=`` (a sandbox that runs one command given at creation, as ``run()``
    does), PID 1 clones that command itself once its mounts are in place, before it
    contains itself: the command is PID 1's child from birth, in its cgroup and every
    namespace, so no join helper, setns or relay runs for it.
``spawn_join(plan, init_pidfd, ...)``
    fork a helper that joins the sandbox's namespaces through the init's pidfd, which
    clones (CLONE_PARENT) the real process: a child of the caller, inside the sandbox,
    that applies landlock + seccomp again and execs the command.

Neither copies the runtime's descriptor table, which in a daemon grows with the sandboxes
it holds: the launcher and the join helper are cloned with CLONE_FILES and, first of all,
cut a table of their own holding only the descriptors below the spawn's cut (fd_cut:
above every descriptor the spawn hands its children). Their children copy that small
table, and execve's close-on-exec pass walks only it. The descriptors the runtime keeps
per sandbox are parked high (park_fd), so the cut stays low.

Failures in a child are reported over a close-on-exec pipe as fixed-size records
(step, errno, detail index); end-of-file without a record means execve succeeded.
"""

from libc.errno cimport errno, EINTR, EEXIST, ENOENT, EACCES
from libc.stdlib cimport malloc, free
from libc.string cimport memset, strlen, memcpy
from posix.unistd cimport read, write, close, _exit, pipe, chdir, setsid, dup2, getpid
from posix.types cimport pid_t

import os
from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit

cdef extern from * nogil:
    """
    #include <fcntl.h>
    #include <grp.h>
    #include <net/if.h>
    #include <sched.h>
    #include <signal.h>
    #include <stdint.h>
    #include <sys/ioctl.h>
    #include <sys/mount.h>
    #include <sys/prctl.h>
    #include <sys/resource.h>
    #include <sys/socket.h>
    #include <sys/stat.h>
    #include <sys/statvfs.h>
    #include <sys/syscall.h>
    #include <sys/wait.h>
    #include <linux/capability.h>
    #include <linux/securebits.h>
    #include <unistd.h>

    #ifndef SYS_pidfd_open
    #define SYS_pidfd_open 434
    #endif
    #ifndef SYS_mount_setattr
    #define SYS_mount_setattr 442
    #endif
    #ifndef SYS_close_range
    #define SYS_close_range 436
    #endif
    #ifndef SYS_landlock_create_ruleset
    #define SYS_landlock_create_ruleset 444
    #define SYS_landlock_add_rule 445
    #define SYS_landlock_restrict_self 446
    #endif
    #ifndef CLOSE_RANGE_CLOEXEC
    #define CLOSE_RANGE_CLOEXEC (1U << 2)
    #endif
    #ifndef CLOSE_RANGE_UNSHARE
    #define CLOSE_RANGE_UNSHARE (1U << 1)
    #endif
    #ifndef AT_RECURSIVE
    #define AT_RECURSIVE 0x8000
    #endif
    #ifndef CLONE_NEWCGROUP
    #define CLONE_NEWCGROUP 0x02000000
    #endif
    #define CORRAL_MOUNT_ATTR_RDONLY 0x00000001
    #define CORRAL_MOUNT_ATTR_NOSUID 0x00000002
    #define CORRAL_MOUNT_ATTR_NODEV  0x00000004
    #define CORRAL_MOUNT_ATTR_NOEXEC 0x00000008

    struct corral_mount_attr { uint64_t attr_set, attr_clr, propagation, userns_fd; };
    struct corral_ll_ruleset_attr { uint64_t handled_access_fs, handled_access_net, scoped; };
    struct corral_ll_path_beneath { uint64_t allowed_access; int32_t parent_fd; } __attribute__((packed));
    struct corral_sock_fprog { unsigned short len; void *filter; };
    struct corral_cap_header { uint32_t version; int pid; };
    struct corral_cap_data { uint32_t effective, permitted, inheritable; };

    static int corral_pivot_root(const char *new_root, const char *put_old) {
        return (int)syscall(SYS_pivot_root, new_root, put_old);
    }
    static int corral_mount_setattr(const char *path, unsigned int flags, uint64_t set) {
        struct corral_mount_attr a = {set, 0, 0, 0};
        return (int)syscall(SYS_mount_setattr, AT_FDCWD, path, flags, &a, sizeof a);
    }
    static int corral_open_tree_clone(const char *path) {
        /* OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE */
        return (int)syscall(428 /* SYS_open_tree */, AT_FDCWD, path, 1 | O_CLOEXEC | AT_RECURSIVE);
    }
    static int corral_move_mount_fd(int fd, const char *target) {
        /* MOVE_MOUNT_F_EMPTY_PATH: attach the detached tree behind fd at target */
        return (int)syscall(429 /* SYS_move_mount */, fd, "", AT_FDCWD, target, 0x00000004);
    }
    static int corral_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
    #define CORRAL_MOUNT_ATTR_IDMAP 0x00100000
    static int corral_idmap_tree(int tree_fd, int userns_fd, uint64_t extra, int recursive) {
        /* Give a detached mount tree (open_tree(OPEN_TREE_CLONE)) the id mapping of
           userns_fd, and the extra MOUNT_ATTR_* bits, on its top mount or every mount. */
        struct corral_mount_attr a = {CORRAL_MOUNT_ATTR_IDMAP | extra, 0, 0, (uint64_t)userns_fd};
        return (int)syscall(SYS_mount_setattr, tree_fd, "",
                            AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &a, sizeof a);
    }
    static int corral_hold_userns(void *arg) {
        /* A process that only exists so that its new user namespace can be given id maps
           and opened; every signal is blocked, SIGKILL ends it. */
        (void)arg;
        for (;;) pause();
        return 0;
    }
    static int corral_unshare_fds_below(unsigned int cut) {
        /* Give this process a descriptor table of its own that holds only the descriptors
           below cut. A child cloned with CLONE_FILES calls this first: the kernel copies
           O(cut) entries (close_range(CLOSE_RANGE_UNSHARE) over [cut, ~0] copies only
           those below cut), where a clone without CLONE_FILES copies every descriptor of
           the runtime (two per idle sandbox in a daemon). Linux 5.9; contain_and_exec's
           CLOSE_RANGE_CLOEXEC already needs 5.11. */
        return (int)syscall(SYS_close_range, cut, ~0U, CLOSE_RANGE_UNSHARE);
    }
    static int corral_clone_userns_holder(void *stack_top) {
        /* CLONE_FILES: the holder never touches a descriptor, and lives only until the
           caller has opened its namespace; a copy of the table would cost O(table). */
        return clone(corral_hold_userns, stack_top,
                     CLONE_VM | CLONE_FILES | CLONE_NEWUSER | SIGCHLD, NULL);
    }
    static int corral_clone_shared_userns_holder(void *stack_top) {
        /* The same, sharing the caller's descriptor table too: it may live for a while,
           and a copy of the table would keep every descriptor open meanwhile (a file
           being written stays busy for execve: ETXTBSY). */
        return clone(corral_hold_userns, stack_top,
                     CLONE_VM | CLONE_FILES | CLONE_NEWUSER | SIGCHLD, NULL);
    }
    struct corral_mntns_holder {
        char **detach;      /* mount points to detach in the new namespace (NULL-ended) */
        int ready_w;        /* one byte once the namespace is ready (or failed) */
        int err;            /* errno of the failing step, 0 when none failed */
        int failed;         /* -1: making the tree private; else index in detach */
    };
    static int corral_hold_mntns(void *arg) {
        /* A process that only exists so that its new mount namespace can be opened: the
           tree is made private first (so that nothing detached below propagates back to
           the namespace it was copied from), then every listed mount point is detached,
           each as often as something is mounted there. Shares the caller's memory: it
           writes its result into the struct, then one byte, then waits for SIGKILL. */
        struct corral_mntns_holder *h = arg;
        h->err = 0;
        h->failed = -1;
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) {
            h->err = errno;
        } else {
            for (int i = 0; h->detach[i] != NULL && h->err == 0; i++) {
                while (umount2(h->detach[i], MNT_DETACH) == 0) {}
                if (errno != EINVAL && errno != ENOENT) {
                    h->err = errno;
                    h->failed = i;
                }
            }
        }
        while (write(h->ready_w, "r", 1) < 0 && errno == EINTR) {}
        for (;;) pause();
        return 0;
    }
    static int corral_clone_mntns_holder(void *stack_top, struct corral_mntns_holder *h) {
        return clone(corral_hold_mntns, stack_top, CLONE_VM | CLONE_NEWNS | SIGCHLD, h);
    }
    static int corral_exec_helper(void *arg) {
        /* A setuid id-map helper (newuidmap/newgidmap), run by the launcher or (sharing
           the runtime's descriptor table) by UserNamespaceInProgress. It needs only
           stdio: a table of its own with only those, so that execve neither copies nor
           walks the runtime's. */
        char **argv = (char **)arg;
        static char *const empty_env[] = {NULL};
        if (corral_unshare_fds_below(3) != 0) _exit(127);
        execve(argv[0], argv, empty_env);
        _exit(127);
    }
    static int corral_start_helper(char **argv, void *stack_top) {
        /* Returns at once: the helper runs on its own stack in this address space, with
           this descriptor table (exec gives it its own, close-on-exec ones closed), until
           it execs; argv and the stack must live until it has been waited for. */
        return clone(corral_exec_helper, stack_top, CLONE_VM | CLONE_FILES | SIGCHLD, argv);
    }
    static int corral_wait_status(int pid) {
        int status = 0;
        if (pid < 0) return -1;
        while (waitpid(pid, &status, 0) < 0) {
            if (errno != EINTR) return -1;
        }
        return status;
    }
    static void corral_run_helpers(char **argv1, void *stack1, char **argv2, void *stack2,
                                   int *status1, int *status2) {
        /* Both helpers at once (each is a setuid exec costing milliseconds). The first
           shares this address space without CLONE_VFORK, on its own stack, and does
           nothing but execve; the second is vfork-style. Statuses: wait status, or -1
           when the helper could not be started. */
        int pid1 = clone(corral_exec_helper, stack1, CLONE_VM | SIGCHLD, argv1);
        int pid2 = clone(corral_exec_helper, stack2, CLONE_VM | CLONE_VFORK | SIGCHLD, argv2);
        *status2 = corral_wait_status(pid2);
        *status1 = corral_wait_status(pid1);
    }
    static int corral_setns(int fd, int nstype) { return (int)syscall(SYS_setns, fd, nstype); }
    static int corral_unshare(int flags) { return (int)syscall(SYS_unshare, flags); }
    static int corral_close_range_cloexec(unsigned int first) {
        return (int)syscall(SYS_close_range, first, ~0U, CLOSE_RANGE_CLOEXEC);
    }
    static int corral_setresuid0(void) {
        if (syscall(SYS_setresgid, 0, 0, 0)) return -1;
        return (int)syscall(SYS_setresuid, 0, 0, 0);
    }
    static int corral_become_owner(unsigned int uid) {
        /* Only the effective uid: the launcher keeps real and saved uid 0 and can switch
           back. SECBIT_NO_SETUID_FIXUP keeps its effective capabilities meanwhile (a host
           that restricts unprivileged user namespaces still lets it create one). A raw
           syscall: glibc's setresuid would change every thread of the runtime, whose
           memory this vfork child shares. */
        int bits = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
        if (bits >= 0)
            prctl(PR_SET_SECUREBITS, bits | SECBIT_NO_SETUID_FIXUP, 0, 0, 0);
        return (int)syscall(SYS_setresuid, -1, uid, -1);
    }
    static int corral_back_to_root(void) {
        return (int)syscall(SYS_setresuid, -1, 0, -1);
    }
    static int corral_lift_user_pools(void) {
        /* A new user namespace copies these four limits of its creator as the cap on what
           everything inside may charge, together, to the owner in the parent namespace.
           Lifted, each sandbox is its own accounting domain, bounded by its processes' own
           limits and its cgroup, whichever other sandbox shares its owner uid. PID 1 sets
           the runtime's values back for itself (ChildPlan rlimits). Raising a hard limit
           needs CAP_SYS_RESOURCE; without it the pools stay shared by the sandboxes of
           one owner uid (host root is not charged either way). Returns how many were
           lifted. */
        static const int pooled[] = {RLIMIT_MSGQUEUE, RLIMIT_SIGPENDING, RLIMIT_NPROC,
                                     RLIMIT_MEMLOCK};
        struct rlimit inf = {RLIM_INFINITY, RLIM_INFINITY};
        int lifted = 0;
        for (unsigned i = 0; i < sizeof pooled / sizeof pooled[0]; i++)
            if (setrlimit(pooled[i], &inf) == 0) lifted++;
        return lifted;
    }
    struct corral_ns_launch {
        void *holder_stack_top;  /* the holder's stack (this address space) */
        long owner_uid;          /* >= 0: create the namespaces with this effective uid */
        int pid;                 /* the holder, a child of the caller (CLONE_PARENT) */
        int err;                 /* errno of the failing step, 0 when none failed */
    };
    static int corral_ns_launcher(void *arg) {
        /* vfork child of the runtime: clones a holder into a new user namespace and a
           network namespace owned by it, created as the sandbox's own host uid with the
           per-user limits lifted, as init_launcher creates PID 1's (the namespace copies
           its creator's limits and is charged to its owner). The holder is the caller's
           child, so this launcher exits at once and the caller writes the maps. */
        struct corral_ns_launch *l = arg;
        l->pid = -1;
        l->err = 0;
        if (l->owner_uid >= 0) {
            corral_lift_user_pools();
            if (corral_become_owner((unsigned int)l->owner_uid) != 0) {
                l->err = errno;
                _exit(1);
            }
        }
        l->pid = clone(corral_hold_userns, l->holder_stack_top,
                       CLONE_VM | CLONE_FILES | CLONE_PARENT | CLONE_NEWUSER | CLONE_NEWNET
                       | SIGCHLD, NULL);
        if (l->pid < 0) l->err = errno;
        _exit(0);
    }
    static int corral_make_sandbox_namespaces(void *stack_top, struct corral_ns_launch *l) {
        /* Run corral_ns_launcher (vfork-style, on stack_top) and reap it; returns the
           holder's pid, or -1 with errno set. */
        int status = 0;
        int launcher = clone(corral_ns_launcher, stack_top,
                             CLONE_VM | CLONE_VFORK | CLONE_FILES | SIGCHLD, l);
        if (launcher < 0) return -1;
        while (waitpid(launcher, &status, 0) < 0 && errno == EINTR) {}
        if (l->pid < 0) {
            errno = l->err ? l->err : EIO;
            return -1;
        }
        return l->pid;
    }
    static int corral_execveat_fd(int fd, char *const argv[], char *const envp[]) {
        return (int)syscall(SYS_execveat, fd, "", argv, envp, AT_EMPTY_PATH);
    }
    static int corral_seccomp_load(void *filter, unsigned short len, unsigned int flags) {
        struct corral_sock_fprog prog = {len, filter};
        return (int)syscall(SYS_seccomp, 1 /* SECCOMP_SET_MODE_FILTER */, flags, &prog);
    }
    static int corral_landlock_create(uint64_t fs, uint64_t scoped, int abi) {
        struct corral_ll_ruleset_attr a = {fs, 0, scoped};
        /* Older ABIs reject a larger struct; pass only the fields they know. */
        size_t size = abi >= 6 ? sizeof a : (abi >= 4 ? 16 : 8);
        return (int)syscall(SYS_landlock_create_ruleset, &a, size, 0);
    }
    static int corral_landlock_add_path(int ruleset, int parent_fd, uint64_t access) {
        struct corral_ll_path_beneath pb = {access, parent_fd};
        return (int)syscall(SYS_landlock_add_rule, ruleset, 1 /* PATH_BENEATH */, &pb, 0);
    }
    static int corral_landlock_restrict(int ruleset) {
        return (int)syscall(SYS_landlock_restrict_self, ruleset, 0);
    }
    static int corral_drop_caps(int last_cap, long run_uid, long run_gid) {
        /* Lock root out of regaining capabilities on execve, then empty every set. With
           run_uid >= 0, become that user in between: the
           securebits keep the capabilities through setresuid until capset empties them.
           Raw syscalls: glibc's set*id would signal every thread of the runtime. */
        if (prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED |
                  SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED |
                  SECBIT_KEEP_CAPS_LOCKED, 0, 0, 0))
            return -1;
        for (int cap = 0; cap <= last_cap; cap++) {
            if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL)
                return -1;
        }
        if (run_uid >= 0) {
            /* setgroups is "deny" in every sandbox's namespace (EPERM): the groups
               PID 1 was created with stay, and none is a mapped id inside */
            if (syscall(SYS_setgroups, 0, NULL) && errno != EPERM) return -1;
            if (syscall(SYS_setresgid, run_gid, run_gid, run_gid)) return -1;
            if (syscall(SYS_setresuid, run_uid, run_uid, run_uid)) return -1;
        }
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) && errno != EINVAL)
            return -1;
        struct corral_cap_header h = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct corral_cap_data d[2];
        memset(d, 0, sizeof d);
        return (int)syscall(SYS_capset, &h, d);
    }
    static int corral_loopback_up(void) {
        int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (s < 0) return -1;
        struct ifreq ifr;
        memset(&ifr, 0, sizeof ifr);
        memcpy(ifr.ifr_name, "lo", 3);
        int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
        if (rc == 0) {
            ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
            rc = ioctl(s, SIOCSIFFLAGS, &ifr);
        }
        int saved = errno;
        close(s);
        errno = saved;
        return rc;
    }
    static int corral_set_rlimit(int resource, unsigned long long soft, unsigned long long hard) {
        struct rlimit rl = {(rlim_t)soft, (rlim_t)hard};
        return setrlimit(resource, &rl);
    }
    static void corral_set_errno(int e) { errno = e; }
    #include <poll.h>
    static int corral_fd_readable(int fd) {
        struct pollfd p = {fd, POLLIN, 0};
        return poll(&p, 1, 0) == 1;
    }
    static int corral_wait_readable(int fd) {
        struct pollfd p = {fd, POLLIN, 0};
        int n;
        while ((n = poll(&p, 1, -1)) < 0 && errno == EINTR) {}
        return n == 1 ? 0 : -1;
    }
    static int corral_file_empty(const char *path) {
        char c;
        ssize_t n;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return 1;
        while ((n = read(fd, &c, 1)) < 0 && errno == EINTR) {}
        close(fd);
        return n != 1;
    }
    #include <sys/mman.h>
    #define CORRAL_STACK_SIZE (256 * 1024)
    #define CORRAL_PATH_MAX 4096
    static void *corral_stack_alloc(void) {
        void *p = mmap(NULL, CORRAL_STACK_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
    static void corral_stack_free(void *p) { if (p) munmap(p, CORRAL_STACK_SIZE); }
    static void *corral_stack_top(void *p) { return (char *)p + CORRAL_STACK_SIZE; }
    static int corral_vfork_clone(int (*fn)(void *), void *stack_top, int flags, void *arg) {
        /* vfork-style: the child borrows this address space (no page tables copied) and
           the calling thread sleeps until it execs or exits. */
        return clone(fn, stack_top, CLONE_VM | CLONE_VFORK | flags, arg);
    }
    static int corral_vfork_clone_ns(int (*fn)(void *), void *stack_top, int flags, void *arg) {
        /* CLONE_VM without CLONE_VFORK: the caller must keep the stack alive and must
           not return to the runtime until the child has exec'd (see init_launcher). */
        return clone(fn, stack_top, CLONE_VM | SIGCHLD | flags, arg);
    }
    static int corral_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }
    static int corral_block_signals(sigset_t *old) {
        sigset_t all;
        sigfillset(&all);
        return pthread_sigmask(SIG_BLOCK, &all, old);
    }
    static void corral_restore_signals(const sigset_t *old) {
        pthread_sigmask(SIG_SETMASK, old, NULL);
    }
    static int corral_reset_signals(void) {
        /* A Python parent ignores SIGPIPE and SIGXFSZ and may block signals in the
           spawning thread; ignored dispositions and the mask survive execve, so give
           the command the defaults a shell would. */
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = SIG_DFL;
        for (int sig = 1; sig < _NSIG; sig++) {
            if (sig == SIGKILL || sig == SIGSTOP) continue;
            sigaction(sig, &sa, NULL);  /* EINVAL for the few reserved numbers: ignored */
        }
        sigset_t none;
        sigemptyset(&none);
        return sigprocmask(SIG_SETMASK, &none, NULL);
    }
    static int corral_write_all(int fd, const char *buf, size_t len) {
        while (len > 0) {
            ssize_t n = write(fd, buf, len);
            if (n < 0) { if (errno == EINTR) continue; return -1; }
            buf += n; len -= (size_t)n;
        }
        return 0;
    }
    """
    int corral_pivot_root(const char *new_root, const char *put_old)
    int corral_mount_setattr(const char *path, unsigned int flags, unsigned long long set)
    int corral_pidfd_open(pid_t pid)
    int corral_idmap_tree(int tree_fd, int userns_fd, unsigned long long extra, int recursive)
    int corral_clone_userns_holder(void *stack_top)
    int corral_clone_shared_userns_holder(void *stack_top)
    int corral_start_helper(char **argv, void *stack_top)
    int corral_wait_status(int pid)
    struct corral_mntns_holder:
        char **detach
        int ready_w
        int err
        int failed
    int corral_clone_mntns_holder(void *stack_top, corral_mntns_holder *h)
    struct corral_ns_launch:
        void *holder_stack_top
        long owner_uid
        int pid
        int err
    int corral_make_sandbox_namespaces(void *stack_top, corral_ns_launch *l)
    void corral_run_helpers(char **argv1, void *stack1, char **argv2, void *stack2,
                            int *status1, int *status2)
    int corral_open_tree_clone(const char *path)
    int corral_move_mount_fd(int fd, const char *target)
    int corral_setns(int fd, int nstype)
    int corral_unshare(int flags)
    int corral_close_range_cloexec(unsigned int first)
    int corral_unshare_fds_below(unsigned int cut)
    int corral_setresuid0()
    int corral_become_owner(unsigned int uid)
    int corral_back_to_root()
    int corral_lift_user_pools()
    int corral_execveat_fd(int fd, char **argv, char **envp)
    int corral_seccomp_load(void *filter, unsigned short len, unsigned int flags)
    int corral_landlock_create(unsigned long long fs, unsigned long long scoped, int abi)
    int corral_landlock_add_path(int ruleset, int parent_fd, unsigned long long access)
    int corral_landlock_restrict(int ruleset)
    int corral_drop_caps(int last_cap, long run_uid, long run_gid)
    int corral_loopback_up()
    int corral_set_rlimit(int resource, unsigned long long soft, unsigned long long hard)
    int corral_write_all(int fd, const char *buf, size_t len)
    void corral_set_errno(int e)
    int corral_fd_readable(int fd)
    int corral_wait_readable(int fd)
    int corral_file_empty(const char *path)
    ctypedef struct sigset_t:
        pass
    enum: CORRAL_PATH_MAX
    void *corral_stack_alloc()
    void corral_stack_free(void *p)
    void *corral_stack_top(void *p)
    int corral_vfork_clone(int (*fn)(void *) noexcept nogil, void *stack_top, int flags, void *arg)
    int corral_vfork_clone_ns(int (*fn)(void *) noexcept nogil, void *stack_top, int flags, void *arg)
    int corral_block_signals(sigset_t *old)
    int corral_pipe_cloexec(int *fds)
    void corral_restore_signals(const sigset_t *old)
    int corral_reset_signals()

    int mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const void *data)
    int umount2(const char *target, int flags)
    int mkdir(const char *path, unsigned int mode)
    int chmod(const char *path, unsigned int mode)
    int symlink(const char *target, const char *linkpath)
    int unlink(const char *path)
    int open(const char *path, int flags, ...)
    int fcntl(int fd, int cmd, ...)
    int execve(const char *path, char **argv, char **envp)
    int sethostname(const char *name, size_t len)
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)
    int kill(pid_t pid, int sig)
    pid_t waitpid(pid_t pid, int *status, int options)
    int ioctl(int fd, unsigned long request, ...)
    unsigned long TIOCSCTTY

    int O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_CLOEXEC, O_PATH, O_DIRECTORY, O_NOFOLLOW
    int F_DUPFD_CLOEXEC, F_SETFD
    int MS_BIND, MS_REC, MS_PRIVATE, MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT
    int MNT_DETACH, AT_RECURSIVE
    int CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUTS
    int CLONE_NEWIPC, CLONE_NEWCGROUP, CLONE_PARENT, CLONE_FILES
    int SIGCHLD, SIGKILL
    int PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_SET_DUMPABLE
    int CORRAL_MOUNT_ATTR_RDONLY, CORRAL_MOUNT_ATTR_NOSUID, CORRAL_MOUNT_ATTR_NODEV
    int CORRAL_MOUNT_ATTR_NOEXEC


# --------------------------------------------------------------------------------------
# Steps: every child failure names one of these. contain.py maps them to readable names.
# --------------------------------------------------------------------------------------

cdef enum Step:
    STEP_NONE = 0
    STEP_WAIT_PARENT = 1
    STEP_CGROUP_ATTACH = 2
    STEP_SETRESUID = 3
    STEP_UNSHARE_CGROUP = 4
    STEP_HOSTNAME = 5
    STEP_LOOPBACK = 6
    STEP_MOUNT = 7
    STEP_MKDIR = 8
    STEP_WRITE_FILE = 9
    STEP_SYMLINK = 10
    STEP_READONLY = 11
    STEP_PIVOT_ROOT = 12
    STEP_CHDIR = 13
    STEP_SETSID = 14
    STEP_FDS = 15
    STEP_RLIMIT = 16
    STEP_CAPS = 17
    STEP_NO_NEW_PRIVS = 18
    STEP_LANDLOCK = 19
    STEP_SECCOMP = 20
    STEP_EXECVE = 21
    STEP_SETNS = 22
    STEP_CLONE = 23
    STEP_PDEATHSIG = 24
    STEP_SIGNALS = 25
    STEP_ID_MAPS = 26
    STEP_OWNER = 27
    STEP_SYSCTL = 28
    STEP_CTTY = 29

STEP_NAMES = {
    STEP_WAIT_PARENT: "wait-for-parent",
    STEP_CGROUP_ATTACH: "cgroup-attach",
    STEP_SETRESUID: "setresuid",
    STEP_UNSHARE_CGROUP: "unshare(CLONE_NEWCGROUP)",
    STEP_HOSTNAME: "sethostname",
    STEP_LOOPBACK: "loopback-up",
    STEP_MOUNT: "mount",
    STEP_MKDIR: "mkdir",
    STEP_WRITE_FILE: "write-file",
    STEP_SYMLINK: "symlink",
    STEP_READONLY: "mount_setattr",
    STEP_PIVOT_ROOT: "pivot_root",
    STEP_CHDIR: "chdir",
    STEP_SETSID: "setsid",
    STEP_FDS: "dup2(fds)",
    STEP_RLIMIT: "setrlimit",
    STEP_CAPS: "drop-capabilities",
    STEP_NO_NEW_PRIVS: "prctl(PR_SET_NO_NEW_PRIVS)",
    STEP_LANDLOCK: "landlock",
    STEP_SECCOMP: "seccomp",
    STEP_EXECVE: "execve",
    STEP_SETNS: "setns",
    STEP_CLONE: "clone",
    STEP_PDEATHSIG: "prctl(PR_SET_PDEATHSIG)",
    STEP_SIGNALS: "reset-signals",
    STEP_ID_MAPS: "write uid_map/gid_map",
    STEP_OWNER: "setresuid(owner)",
    STEP_SYSCTL: "write /proc/sys/user limit",
    STEP_CTTY: "ioctl(TIOCSCTTY)",
}

# Mount plan op kinds; corral.sandbox.mounts produces them (same numbers).
cdef enum OpKind:
    OP_MKDIR = 1        # target, mode
    OP_MOUNT = 2        # source, target, fstype, flags, data
    OP_SETATTR = 3      # target: mount_setattr(flags = MOUNT_ATTR_* to set), mode 1 = recursive
    OP_FILE = 4         # target, data (content), mode
    OP_SYMLINK = 5      # source (link text), target
    OP_PIVOT = 6        # target: the new root
    OP_MASK_FILE = 7    # target: bind /dev/null over it when it exists
    OP_MASK_DIR = 8     # target: source (an empty directory) bound read-only over it, when it exists
    OP_TOUCH = 9        # target: empty file (a bind-mount point)
    OP_RO_SELF = 10     # target: bound onto itself and made read-only, when it exists
    OP_ATTACH = 11      # target: attach the detached mount tree of descriptor `flags`
    OP_SYSCTLS = 12     # target: the sandbox's own /proc/sys/user; the plan's sysctls go there

OP_KINDS = {
    "mkdir": OP_MKDIR, "mount": OP_MOUNT, "setattr": OP_SETATTR, "file": OP_FILE,
    "symlink": OP_SYMLINK, "pivot": OP_PIVOT, "mask_file": OP_MASK_FILE,
    "mask_dir": OP_MASK_DIR, "touch": OP_TOUCH, "ro_self": OP_RO_SELF,
    "attach": OP_ATTACH, "sysctls": OP_SYSCTLS,
}

cdef struct mount_op:
    int kind
    char *source
    char *target
    char *fstype
    unsigned long flags
    char *data
    size_t data_len
    unsigned int mode
    int source_base     # >= 0: source is plan.bases[source_base] followed by this (MountTable)
    int target_base     # the same for target
    int plan_fd         # attach: move plan.attach_fd, not flags (MountTable)

cdef struct ll_rule:
    char *path
    unsigned long long access

cdef struct rlimit_op:
    int resource
    unsigned long long soft
    unsigned long long hard

cdef struct fd_map:
    int parent_fd
    int child_fd

cdef struct report:
    int kind        # 1 = failure, 2 = pid of the joined process
    int step
    int err
    int detail      # index of the failing op / rule / path, or the pid


cdef struct child_plan:
    mount_op *ops
    int n_ops
    char *bases[3]       # what a MountTable's placeholders stand for (NULL: none given)
    int attach_fd        # the descriptor of a MountTable's attach op with plan_fd
    ll_rule *ll_rules
    int n_ll_rules
    unsigned long long ll_handled
    unsigned long long ll_scoped
    int ll_abi
    rlimit_op *rlimits
    int n_rlimits
    fd_map *fds
    int n_fds
    char **argv
    char **envp
    char **search_path   # PATH entries for a bare command name
    char *cwd
    char *hostname
    char *bpf
    unsigned short bpf_len
    unsigned int bpf_flags
    int *cgroup_fds
    int n_cgroup_fds
    int last_cap
    int pdeathsig
    int parent_pidfd     # pidfd of the runtime itself, set by spawn_init/spawn_join
    int exec_fd          # init: execveat this fd instead of argv[0]
    char **sysctl_names  # init: /proc/sys/user/* files of the new user namespace...
    char **sysctl_values # ...and the values written to them (NULL-terminated arrays)
    int ctty             # commands: make descriptor 0 (a pty slave) the controlling terminal
    long run_uid         # commands: the uid/gid inside to run as (-1: root)
    long run_gid


cdef class _CData:
    """C arrays and NUL-terminated strings whose memory this object owns (freed with it)."""

    cdef list _keep            # bytes objects whose buffers the C arrays point into

    def __cinit__(self):
        self._keep = []

    cdef void *_alloc(self, size_t size) except NULL:
        cdef void *p = malloc(size)
        if p == NULL:
            raise MemoryError()
        memset(p, 0, size)
        return p

    cdef void *_array(self, list items, size_t item_size, int *count) except NULL:
        # A zeroed C array for len(items) entries and a spare one; *count = len(items).
        count[0] = len(items)
        return self._alloc(item_size * (count[0] + 1))

    cdef char *_bytes(self, bytes raw) except NULL:
        # NUL-terminated copy kept alive by self._keep.
        cdef bytes buf = raw + b"\0"
        self._keep.append(buf)
        return <char *>buf

    cdef char *_str(self, value) except NULL:
        raw = os.fsencode(value)
        if b"\0" in raw:
            raise ValueError(f"{value!r} contains a NUL byte")
        return self._bytes(raw)

    cdef char **_strv(self, values) except NULL:
        items = list(values)
        cdef char **v = <char **>self._alloc(sizeof(char *) * (len(items) + 1))
        cdef int i
        try:
            for i, item in enumerate(items):
                v[i] = self._str(item)
        except BaseException:
            free(v)
            raise
        v[len(items)] = NULL
        return v

    cdef int _fill_ops(self, mount_op *out, list ops, tuple bases) except -1:
        """out[i] = ops[i], (kind, source, target, fstype, flags, data, mode) tuples. With
        bases (placeholder names), a source or target that is a placeholder, or one
        followed by "/", is stored as its index and the rest; an attach whose descriptor
        (flags) is negative takes the plan's attach_fd."""
        cdef int i
        for i, (kind, source, target, fstype, flags, data, mode) in enumerate(ops):
            out[i].kind = OP_KINDS[kind]
            out[i].source_base, source = _split_base(source, bases)
            out[i].target_base, target = _split_base(target, bases)
            out[i].source = self._str(source) if source is not None else NULL
            out[i].target = self._str(target)
            out[i].fstype = self._str(fstype) if fstype is not None else NULL
            out[i].plan_fd = 1 if bases and kind == "attach" and flags < 0 else 0
            out[i].flags = 0 if out[i].plan_fd else flags
            if data is None:
                out[i].data = NULL
                out[i].data_len = 0
            else:
                raw = data.encode() if isinstance(data, str) else bytes(data)
                out[i].data = self._bytes(raw)
                out[i].data_len = len(raw)
            out[i].mode = mode
        return 0


cdef tuple _split_base(value, tuple bases):
    """(index of the placeholder value starts with, the rest), or (-1, value)."""
    cdef int i
    if value is None or not bases:
        return -1, value
    for i, name in enumerate(bases):
        if value == name:
            return i, ""
        if value.startswith(name + "/"):
            return i, value[len(name):]
    return -1, value


cdef class MountTable(_CData):
    """A mount plan converted to C once, for every ChildPlan of the sandboxes that share
    it (a template of mounts.py, one per policy): its paths under a sandbox's own
    directories are kept as placeholders, which each ChildPlan's mount_bases stand for."""

    cdef mount_op *ops
    cdef int n_ops
    cdef readonly int bases

    def __init__(self, mount_ops, bases=()):
        """mount_ops: (kind, source, target, fstype, flags, data, mode) tuples; bases:
        the placeholder names (at most 3) their paths may start with, in the order a
        ChildPlan's mount_bases gives their values."""
        ops = list(mount_ops)
        names = tuple(bases)
        if len(names) > 3:
            raise ValueError("a mount table has at most 3 placeholders")
        self.bases = len(names)
        self.ops = <mount_op *>self._array(ops, sizeof(mount_op), &self.n_ops)
        self._fill_ops(self.ops, ops, names)

    def __len__(self):
        return self.n_ops

    def __dealloc__(self):
        free(self.ops)


cdef class ChildPlan(_CData):
    """Everything a child needs, as C data owned by this object (freed with it)."""

    cdef child_plan c
    cdef MountTable _table     # the shared mount ops, when a MountTable was given...
    cdef bint _table_ops       # ...which c.ops then points into (a C flag: a collection
                               # may clear _table before __dealloc__ runs)

    def __init__(self, *, argv, envp=(), search_path=(), cwd="/", hostname=None,
                 mount_ops=(), mount_bases=(), attach_fd=-1, landlock_rules=(),
                 landlock_handled=0, landlock_scoped=0,
                 landlock_abi=0, rlimits=(), fds=(), seccomp_bpf=None, seccomp_flags=0, cgroup_fds=(),
                 last_cap=40, pdeathsig=0, exec_fd=-1, sysctls=(), ctty=False, user=None):
        """Build the C arrays.

        Args:
            argv: the command (argv[0] is resolved through search_path when it has no '/').
            envp: "K=V" strings.
            mount_ops: (kind, source, target, fstype, flags, data, mode) tuples, or a
                MountTable (shared, not copied).
            mount_bases: a MountTable's placeholder values, as many as it has (paths).
            attach_fd: the descriptor a MountTable's attach op with a negative one moves.
            landlock_rules: (path, access_mask) tuples; empty with landlock_handled=0
                means no landlock.
            rlimits: (resource, soft, hard) tuples.
            fds: (parent_fd, child_fd) pairs to install in the child; all other
                descriptors are closed on execve.
            seccomp_bpf: raw struct sock_filter array, or None for no filter.
            seccomp_flags: flags of seccomp(SECCOMP_SET_MODE_FILTER), e.g. LOG.
            cgroup_fds: open cgroup.procs descriptors the child writes "0" into.
            sysctls: (name, value) pairs of that namespace's own /proc/sys/user limits,
                which PID 1 writes at the plan's "sysctls" op (in the directory it names).
            ctty: after setsid and the fds, make descriptor 0 (which must be a terminal,
                e.g. a pty slave of the sandbox's own devpts) the controlling terminal.
            user: (uid, gid) inside to run as, with no supplementary groups; None: root.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        self.c.argv = self._strv(argv)
        self.c.envp = self._strv(envp)
        self.c.search_path = self._strv(search_path)
        self.c.cwd = self._str(cwd)
        self.c.hostname = self._str(hostname) if hostname else NULL
        self._set_mount_ops(mount_ops, mount_bases, attach_fd)
        self._set_landlock(landlock_rules, landlock_handled, landlock_scoped, landlock_abi)
        self._set_rlimits(rlimits)
        self._set_fds(fds)
        self._set_seccomp(seccomp_bpf, seccomp_flags)
        self._set_cgroup_fds(cgroup_fds)
        self.c.last_cap = last_cap
        self.c.pdeathsig = pdeathsig
        self.c.parent_pidfd = -1
        self.c.exec_fd = exec_fd
        self.c.ctty = 1 if ctty else 0
        self.c.run_uid, self.c.run_gid = (-1, -1) if user is None else (user[0], user[1])
        pairs = list(sysctls)
        self.c.sysctl_names = self._strv([name for name, _ in pairs])
        self.c.sysctl_values = self._strv([str(value) for _, value in pairs])

    # Each _set_* fills one group of the C plan from its Python argument (in argument order).

    cdef int _set_mount_ops(self, mount_ops, mount_bases, int attach_fd) except -1:
        cdef int i
        cdef MountTable table
        bases = list(mount_bases)
        self.c.attach_fd = attach_fd
        if isinstance(mount_ops, MountTable):
            table = <MountTable>mount_ops
            if len(bases) != table.bases:
                raise ValueError(f"the mount table has {table.bases} placeholders, "
                                 f"{len(bases)} values were given")
            self._table = table
            self._table_ops = True
            self.c.ops = table.ops
            self.c.n_ops = table.n_ops
        else:
            if bases:
                raise ValueError("mount_bases go with a MountTable")
            ops = list(mount_ops)
            self.c.ops = <mount_op *>self._array(ops, sizeof(mount_op), &self.c.n_ops)
            self._fill_ops(self.c.ops, ops, ())
        for i in range(3):
            self.c.bases[i] = self._str(bases[i]) if i < len(bases) else NULL
        return 0

    cdef int _set_landlock(self, landlock_rules, handled, scoped, abi) except -1:
        cdef int i
        rules = list(landlock_rules)
        self.c.ll_rules = <ll_rule *>self._array(rules, sizeof(ll_rule), &self.c.n_ll_rules)
        for i, (path, access) in enumerate(rules):
            self.c.ll_rules[i].path = self._str(path)
            self.c.ll_rules[i].access = access
        self.c.ll_handled = handled
        self.c.ll_scoped = scoped
        self.c.ll_abi = abi
        return 0

    cdef int _set_rlimits(self, rlimits) except -1:
        cdef int i
        lims = list(rlimits)
        self.c.rlimits = <rlimit_op *>self._array(lims, sizeof(rlimit_op), &self.c.n_rlimits)
        for i, (res, soft, hard) in enumerate(lims):
            self.c.rlimits[i].resource = res
            self.c.rlimits[i].soft = soft
            self.c.rlimits[i].hard = hard
        return 0

    cdef int _set_fds(self, fds) except -1:
        cdef int i
        fdl = list(fds)
        self.c.fds = <fd_map *>self._array(fdl, sizeof(fd_map), &self.c.n_fds)
        for i, (pfd, cfd) in enumerate(fdl):
            self.c.fds[i].parent_fd = pfd
            self.c.fds[i].child_fd = cfd
        return 0

    cdef int _set_seccomp(self, seccomp_bpf, seccomp_flags) except -1:
        if seccomp_bpf:
            if len(seccomp_bpf) % 8 or len(seccomp_bpf) // 8 > 4096:
                raise ValueError("seccomp program must be 1..4096 sock_filter entries")
            self.c.bpf = self._bytes(bytes(seccomp_bpf))
            self.c.bpf_len = len(seccomp_bpf) // 8
            self.c.bpf_flags = seccomp_flags
        else:
            self.c.bpf = NULL
            self.c.bpf_len = 0
        return 0

    cdef int _set_cgroup_fds(self, cgroup_fds) except -1:
        cdef int i
        cg = list(cgroup_fds)
        self.c.cgroup_fds = <int *>self._array(cg, sizeof(int), &self.c.n_cgroup_fds)
        for i, fd in enumerate(cg):
            self.c.cgroup_fds[i] = fd
        return 0

    def __dealloc__(self):
        # The arrays are malloc'd; the strings they point into belong to self._keep.
        if not self._table_ops:  # a table's ops are the table's
            free(self.c.ops)
        free(self.c.ll_rules)
        free(self.c.rlimits)
        free(self.c.fds)
        free(self.c.argv)
        free(self.c.envp)
        free(self.c.search_path)
        free(self.c.cgroup_fds)
        free(self.c.sysctl_names)
        free(self.c.sysctl_values)


# --------------------------------------------------------------------------------------
# Child side: async-signal-safe C only.
# --------------------------------------------------------------------------------------

cdef void fail(int report_fd, int step, int detail) noexcept nogil:
    cdef report r
    r.kind = 1
    r.step = step
    r.err = errno
    r.detail = detail
    corral_write_all(report_fd, <const char *>&r, sizeof(report))
    _exit(126)


cdef int read_byte(int fd) noexcept nogil:
    cdef char c
    cdef ssize_t n
    while True:
        n = read(fd, &c, 1)
        if n < 0 and errno == EINTR:
            continue
        return <int>n


cdef int attach_cgroups(child_plan *plan) noexcept nogil:
    cdef int i
    for i in range(plan.n_cgroup_fds):
        if corral_write_all(plan.cgroup_fds[i], "0", 1) != 0:
            return i + 1
    return 0


cdef int joined_path(char *buf, const char *base, const char *rest) noexcept nogil:
    """buf = base + rest (buf holds CORRAL_PATH_MAX bytes); -1 (ENAMETOOLONG) when it
    does not fit, or with no base (a placeholder the plan gave no value for: EINVAL)."""
    cdef size_t a, b
    if base == NULL:
        corral_set_errno(22)
        return -1
    a = strlen(base)
    b = strlen(rest)
    if a + b + 1 > CORRAL_PATH_MAX:
        corral_set_errno(36)
        return -1
    memcpy(buf, base, a)
    memcpy(buf + a, rest, b + 1)
    return 0


cdef mount_op *resolved_op(child_plan *plan, int i, mount_op *cur, char *source_buf,
                           char *target_buf) noexcept nogil:
    """plan.ops[i] with its placeholders put back (a MountTable's), in cur; NULL (errno
    set) when a path does not fit."""
    cdef mount_op *op = &plan.ops[i]
    if op.source_base < 0 and op.target_base < 0 and not op.plan_fd:
        return op
    cur[0] = op[0]
    if op.source_base >= 0:
        if joined_path(source_buf, plan.bases[op.source_base], op.source) != 0:
            return NULL
        cur.source = source_buf
    if op.target_base >= 0:
        if joined_path(target_buf, plan.bases[op.target_base], op.target) != 0:
            return NULL
        cur.target = target_buf
    if op.plan_fd:
        cur.flags = <unsigned long>plan.attach_fd
    return cur


cdef int apply_mounts(child_plan *plan, int report_fd) noexcept nogil:
    cdef int i, fd
    cdef mount_op *op
    cdef mount_op cur
    cdef char source_buf[CORRAL_PATH_MAX]
    cdef char target_buf[CORRAL_PATH_MAX]
    for i in range(plan.n_ops):
        op = resolved_op(plan, i, &cur, source_buf, target_buf)
        if op == NULL:
            fail(report_fd, STEP_MOUNT, i)
        if op.kind == OP_MKDIR:
            if mkdir(op.target, op.mode) == 0:
                # mkdir honours the umask (a 1777 scratch directory would come out 1755):
                # the mode a directory Corral makes is the plan's, whatever the umask
                if chmod(op.target, op.mode) != 0:
                    fail(report_fd, STEP_MKDIR, i)
            elif errno != EEXIST:
                fail(report_fd, STEP_MKDIR, i)
        elif op.kind == OP_MOUNT:
            if mount(op.source, op.target, op.fstype, op.flags, op.data) != 0:
                fail(report_fd, STEP_MOUNT, i)
        elif op.kind == OP_SETATTR:
            if corral_mount_setattr(op.target, AT_RECURSIVE if op.mode else 0, op.flags) != 0:
                fail(report_fd, STEP_READONLY, i)
        elif op.kind == OP_FILE or op.kind == OP_TOUCH:
            fd = open(op.target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, op.mode)
            if fd < 0 and errno == EEXIST and op.kind == OP_TOUCH and unlink(op.target) == 0:
                # an image's own file (or link) where Corral binds one (the agent helper):
                # replaced by a fresh mount point in the root's writable upper layer; a
                # directory there still fails (unlink: EISDIR)
                fd = open(op.target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
                          op.mode)
            if fd < 0:
                fail(report_fd, STEP_WRITE_FILE, i)
            if op.kind == OP_FILE and corral_write_all(fd, op.data, op.data_len) != 0:
                fail(report_fd, STEP_WRITE_FILE, i)
            close(fd)
        elif op.kind == OP_SYMLINK:
            if symlink(op.source, op.target) != 0:
                fail(report_fd, STEP_SYMLINK, i)
        elif op.kind == OP_MASK_FILE:
            if mount("/dev/null", op.target, NULL, MS_BIND, NULL) != 0 and errno != ENOENT:
                fail(report_fd, STEP_MOUNT, i)
        elif op.kind == OP_MASK_DIR:
            # a bind of an empty directory, not a tmpfs: no superblock (and so no shrinker
            # in every memory cgroup's table) per masked directory per sandbox
            fd = open(op.target, O_PATH | O_CLOEXEC)
            if fd < 0:
                if errno == ENOENT:
                    continue  # this kernel has no such directory: nothing to hide
                fail(report_fd, STEP_MOUNT, i)
            close(fd)
            if mount(op.source, op.target, NULL, MS_BIND, NULL) != 0:
                fail(report_fd, STEP_MOUNT, i)
            if corral_mount_setattr(op.target, 0,
                                    CORRAL_MOUNT_ATTR_RDONLY | CORRAL_MOUNT_ATTR_NOSUID
                                    | CORRAL_MOUNT_ATTR_NODEV | CORRAL_MOUNT_ATTR_NOEXEC) != 0:
                fail(report_fd, STEP_READONLY, i)
        elif op.kind == OP_RO_SELF:
            if mount(op.target, op.target, NULL, MS_BIND | MS_REC, NULL) != 0:
                if errno == ENOENT:
                    continue
                fail(report_fd, STEP_MOUNT, i)
            if corral_mount_setattr(op.target, AT_RECURSIVE,
                                    CORRAL_MOUNT_ATTR_RDONLY | CORRAL_MOUNT_ATTR_NOSUID
                                    | CORRAL_MOUNT_ATTR_NODEV) != 0:
                fail(report_fd, STEP_READONLY, i)
        elif op.kind == OP_ATTACH:
            if corral_move_mount_fd(<int>op.flags, op.target) != 0:
                fail(report_fd, STEP_MOUNT, i)
        elif op.kind == OP_SYSCTLS:
            write_sysctls(plan, op.target, report_fd)
        elif op.kind == OP_PIVOT:
            # pivot_root(".", ".") stacks the old root under the new one; detaching it
            # leaves only the new tree, with no directory needed for the old root.
            if chdir(op.target) != 0:
                fail(report_fd, STEP_PIVOT_ROOT, i)
            if corral_pivot_root(".", ".") != 0:
                fail(report_fd, STEP_PIVOT_ROOT, i)
            if umount2(".", MNT_DETACH) != 0:
                fail(report_fd, STEP_PIVOT_ROOT, i)
            if chdir("/") != 0:
                fail(report_fd, STEP_PIVOT_ROOT, i)
    return 0


cdef int install_fds(child_plan *plan, int report_fd) noexcept nogil:
    # Two passes so that a target number that is also a source is not clobbered:
    # first lift every source above all targets, then dup2 into place.
    cdef int i, high = 0, fd
    cdef int lifted[64]
    if plan.n_fds > 64:
        corral_set_errno(24)  # EMFILE
        fail(report_fd, STEP_FDS, 0)
    for i in range(plan.n_fds):
        if plan.fds[i].child_fd > high:
            high = plan.fds[i].child_fd
        if plan.fds[i].parent_fd > high:
            high = plan.fds[i].parent_fd
    for i in range(plan.n_fds):
        fd = fcntl(plan.fds[i].parent_fd, F_DUPFD_CLOEXEC, high + 1 + i)
        if fd < 0:
            fail(report_fd, STEP_FDS, i)
        lifted[i] = fd
    for i in range(plan.n_fds):
        if dup2(lifted[i], plan.fds[i].child_fd) < 0:
            fail(report_fd, STEP_FDS, i)
    return 0


cdef int apply_landlock(child_plan *plan, int report_fd) noexcept nogil:
    cdef int ruleset, i, fd
    if plan.ll_handled == 0:
        return 0
    ruleset = corral_landlock_create(plan.ll_handled, plan.ll_scoped, plan.ll_abi)
    if ruleset < 0:
        fail(report_fd, STEP_LANDLOCK, -1)
    for i in range(plan.n_ll_rules):
        fd = open(plan.ll_rules[i].path, O_PATH | O_CLOEXEC)
        if fd < 0:
            if errno == ENOENT:
                continue  # an optional path (e.g. /dev/tty absent): nothing to allow
            fail(report_fd, STEP_LANDLOCK, i)
        if corral_landlock_add_path(ruleset, fd, plan.ll_rules[i].access) != 0:
            fail(report_fd, STEP_LANDLOCK, i)
        close(fd)
    if corral_landlock_restrict(ruleset) != 0:
        fail(report_fd, STEP_LANDLOCK, plan.n_ll_rules)
    close(ruleset)
    return 0


cdef void exec_command(child_plan *plan, int report_fd) noexcept nogil:
    """execve argv[0], searching the plan's PATH when the name has no slash."""
    cdef char buf[4096]
    cdef char *name = plan.argv[0]
    cdef char *dir
    cdef size_t nlen, dlen
    cdef int i = 0, saved = ENOENT, seen_eacces = 0
    cdef const char *p = name
    while p[0] != 0:
        if p[0] == 47:  # '/'
            execve(name, plan.argv, plan.envp)
            fail(report_fd, STEP_EXECVE, -1)
        p += 1
    nlen = strlen(name)
    while plan.search_path[i] != NULL:
        dir = plan.search_path[i]
        i += 1
        dlen = strlen(dir)
        if dlen + 1 + nlen + 1 > sizeof(buf):
            continue
        memcpy(buf, dir, dlen)
        buf[dlen] = 47
        memcpy(buf + dlen + 1, name, nlen + 1)
        execve(buf, plan.argv, plan.envp)
        if errno == EACCES:
            seen_eacces = 1
        elif errno != ENOENT and errno != 20:  # ENOTDIR
            saved = errno
    corral_set_errno(EACCES if seen_eacces else saved)
    fail(report_fd, STEP_EXECVE, -1)


cdef void contain_and_exec(child_plan *plan, int report_fd, bint is_init) noexcept nogil:
    """The tail both children share, in the order of corral.sandbox.contain."""
    cdef int i
    if corral_reset_signals() != 0:
        fail(report_fd, STEP_SIGNALS, -1)
    if chdir(plan.cwd) != 0:
        fail(report_fd, STEP_CHDIR, -1)
    if setsid() < 0:
        fail(report_fd, STEP_SETSID, -1)
    install_fds(plan, report_fd)
    # A session leader with no terminal yet (setsid above): its stdin becomes its
    # controlling terminal, so the pty's line discipline turns ^C/^Z into signals for the
    # foreground group and /dev/tty opens it.
    if plan.ctty and ioctl(0, TIOCSCTTY, 0) != 0:
        fail(report_fd, STEP_CTTY, -1)
    if corral_drop_caps(plan.last_cap, plan.run_uid, plan.run_gid) != 0:
        fail(report_fd, STEP_CAPS, -1)
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        fail(report_fd, STEP_NO_NEW_PRIVS, -1)
    if not is_init:
        # corral-init is exec'd from a descriptor that lives outside the sandbox's view,
        # which landlock would refuse to execute; it runs nothing else, so it does not
        # need the filesystem rules.
        apply_landlock(plan, report_fd)
    # rlimits after landlock: this child still holds the runtime's descriptors below the
    # spawn's cut (fd_cut()), which may be more than the sandbox's RLIMIT_NOFILE, and
    # landlock needs a few more below that limit.
    for i in range(plan.n_rlimits):
        if corral_set_rlimit(plan.rlimits[i].resource, plan.rlimits[i].soft,
                             plan.rlimits[i].hard) != 0:
            fail(report_fd, STEP_RLIMIT, i)
    # Every descriptor not installed above is closed by the execve (or on failure, by
    # _exit); the report pipe is close-on-exec, so end-of-file tells success.
    if corral_close_range_cloexec(3) != 0:
        fail(report_fd, STEP_FDS, -1)
    for i in range(plan.n_fds):  # ...but the descriptors installed on purpose stay open
        if plan.fds[i].child_fd >= 3 and fcntl(plan.fds[i].child_fd, F_SETFD, 0) != 0:
            fail(report_fd, STEP_FDS, i)
    if plan.bpf != NULL and corral_seccomp_load(plan.bpf, plan.bpf_len, plan.bpf_flags) != 0:
        fail(report_fd, STEP_SECCOMP, -1)
    if is_init:
        corral_execveat_fd(plan.exec_fd, plan.argv, plan.envp)
        fail(report_fd, STEP_EXECVE, -1)
    exec_command(plan, report_fd)


cdef void set_death_signal(child_plan *plan, int report_fd) noexcept nogil:
    """PR_SET_PDEATHSIG, after the last uid change (a credential change clears it).

    The runtime may have died before the signal was armed; its pidfd, opened before the
    clone, is readable once it has exited, and then this child must not go on.
    """
    if not plan.pdeathsig:
        return
    if prctl(PR_SET_PDEATHSIG, plan.pdeathsig, 0, 0, 0) != 0:
        fail(report_fd, STEP_PDEATHSIG, -1)
    if plan.parent_pidfd >= 0 and corral_fd_readable(plan.parent_pidfd):
        _exit(126)


cdef void write_sysctls(child_plan *plan, const char *dir, int report_fd) noexcept nogil:
    """Cap this user namespace's own quotas (/proc/sys/user/*: the files are per user
    namespace, and its root may lower them); a sandbox's charges stop here first.

    dir is the sandbox's own procfs, just mounted: in the host's, every user namespace
    that looked a file up left a dentry of its own under one parent and name (the names
    match, the namespace does not), all in one hash chain, so each lookup walked one
    entry per sandbox held (1 ms each at 1,000 sandboxes, 12 files per create)."""
    cdef char path[512]
    cdef size_t dir_len = strlen(dir), name_len
    cdef int i = 0
    while plan.sysctl_names[i] != NULL:
        name_len = strlen(plan.sysctl_names[i])
        if dir_len + name_len + 2 > sizeof(path):
            corral_set_errno(36)  # ENAMETOOLONG
            fail(report_fd, STEP_SYSCTL, i)
        memcpy(path, dir, dir_len)
        path[dir_len] = 47  # '/'
        memcpy(path + dir_len + 1, plan.sysctl_names[i], name_len + 1)
        if write_file(path, plan.sysctl_values[i], strlen(plan.sysctl_values[i])) != 0:
            fail(report_fd, STEP_SYSCTL, i)
        i += 1


cdef struct join_args:
    child_plan *plan
    int ns_pidfd
    int report_fd
    unsigned int fd_cut     # the helper keeps only the descriptors below this (fd_cut())
    void *relay_stack_top
    void *command_stack_top


cdef void init_child(child_plan *plan, int go_fd, int report_fd,
                     join_args *command) noexcept nogil:
    """PID 1 of a new sandbox; runs after clone() with the new namespaces.

    With a command (one-shot), PID 1 clones it right after the mounts: everything the
    command joins (namespaces, cgroup and cgroup namespace, hostname, loopback, root) is
    PID 1's by then, and the command contains itself exactly as a joined one does."""
    # The parent writes uid_map/gid_map, then one byte; EOF means it gave up.
    if read_byte(go_fd) != 1:
        fail(report_fd, STEP_WAIT_PARENT, -1)
    close(go_fd)
    if corral_setresuid0() != 0:
        fail(report_fd, STEP_SETRESUID, -1)
    set_death_signal(plan, report_fd)
    if attach_cgroups(plan) != 0:
        fail(report_fd, STEP_CGROUP_ATTACH, -1)
    # A cgroup namespace rooted at the sandbox's own cgroup, now that we are in it.
    if corral_unshare(CLONE_NEWCGROUP) != 0:
        fail(report_fd, STEP_UNSHARE_CGROUP, -1)
    if plan.hostname != NULL and sethostname(plan.hostname, strlen(plan.hostname)) != 0:
        fail(report_fd, STEP_HOSTNAME, -1)
    if corral_loopback_up() != 0:
        fail(report_fd, STEP_LOOPBACK, -1)
    apply_mounts(plan, report_fd)
    if command != NULL:
        clone_command(command, report_fd)
    contain_and_exec(plan, report_fd, True)


cdef struct init_args:
    child_plan *plan
    int report_fd
    int go_r            # C0 -> PID 1: one byte once the id maps are written
    int go_w
    int exec_r          # PID 1 holds the close-on-exec write end: EOF = exec'd or dead
    int exec_w
    void *init_stack_top
    const char *uid_map
    size_t uid_map_len
    const char *gid_map
    size_t gid_map_len
    long owner_uid      # >= 0: create the user namespace with this effective uid
    int mount_ns_fd     # >= 0: the mount namespace PID 1's own is copied from
    int user_ns_fd      # >= 0: PID 1's user namespace, being id-mapped by the helpers...
    int maps_ready      # ...or mapped already (made ahead: sandbox_namespaces)
    int net_ns_fd       # >= 0: PID 1's network namespace, made ahead (sandbox_namespaces)
    int map_pidfds[2]   # ...behind these pidfds (-1: a helper that never started)
    char **uid_helper   # not NULL: run these (newuidmap, newgidmap) instead of writing the
    char **gid_helper   # maps; argv[1] points to pid_text, filled in with PID 1's pid
    char *pid_text
    void *helper_stack_top
    void *helper2_stack_top
    join_args *command  # not NULL: the one command PID 1 starts itself (spawn_init command=)
    unsigned int fd_cut # the launcher keeps only the descriptors below this (fd_cut())


cdef int init_main(void *arg) noexcept nogil:
    """PID 1 of the new namespaces; shares the runtime's memory until it execs."""
    cdef init_args *a = <init_args *>arg
    close(a.go_w)
    close(a.exec_r)
    init_child(a.plan, a.go_r, a.report_fd, a.command)
    return 127  # not reached


cdef int proc_path(char *buf, long pid, const char *leaf) noexcept nogil:
    """buf = "/proc/<pid>/<leaf>" without snprintf (async-signal-safe)."""
    cdef int i
    memcpy(buf, b"/proc/", 6)
    i = 6 + format_pid(buf + 6, pid)
    buf[i] = 47  # '/'
    memcpy(buf + i + 1, leaf, strlen(leaf) + 1)
    return 0


cdef int format_pid(char *buf, long pid) noexcept nogil:
    """buf = decimal pid, NUL-terminated (buf holds at least 24 bytes); returns its length."""
    cdef char digits[24]
    cdef int n = 0, i = 0
    while True:
        digits[n] = <char>(48 + pid % 10)
        n += 1
        pid //= 10
        if pid == 0:
            break
    while n > 0:
        n -= 1
        buf[i] = digits[n]
        i += 1
    buf[i] = 0
    return i


cdef int run_map_helpers(init_args *a, long pid) noexcept nogil:
    """Run newuidmap and newgidmap for PID 1 (together); on a failure kill it and report
    which helper (1 uid, 2 gid) and its wait status in the detail."""
    cdef int status1 = 0, status2 = 0, which = 0, status = 0
    corral_run_helpers(a.uid_helper, a.helper_stack_top, a.gid_helper, a.helper2_stack_top,
                       &status1, &status2)
    if status1 == 0 and status2 == 0:
        return 0
    which, status = (1, status1) if status1 != 0 else (2, status2)
    kill(pid, SIGKILL)
    if status > 0:
        corral_set_errno(1)  # EPERM: the helper refused the mapping (it said why on stderr)
    fail(a.report_fd, STEP_ID_MAPS, (which << 16) | (status & 0xffff))
    return -1


cdef int wait_for_maps(init_args *a) noexcept nogil:
    """In the launcher, which joined the namespace being mapped: wait until both helpers
    have exited (their pidfds turn readable); 0 when both maps are written."""
    cdef int i
    for i in range(2):
        if a.map_pidfds[i] < 0 or corral_wait_readable(a.map_pidfds[i]) != 0:
            return -1
    if corral_file_empty("/proc/self/uid_map") or corral_file_empty("/proc/self/gid_map"):
        return -1
    return 0


cdef int write_proc_file(long pid, const char *leaf, const char *data, size_t len) noexcept nogil:
    cdef char path[64]
    proc_path(path, pid, leaf)
    return write_file(path, data, len)


cdef int enter_launcher_namespaces(init_args *a) noexcept nogil:
    """Where the launcher clones PID 1 from; returns CLONE_NEWUSER, or 0 when PID 1 is
    made in a user namespace joined here."""
    # PID 1's mount namespace is a copy of the launcher's: join the small base namespace
    # first, so the copy does not grow with the mounts the runtime holds (a workspace per
    # sandbox) and neither does what PID 1 makes private and detaches at pivot_root.
    if a.mount_ns_fd >= 0 and corral_setns(a.mount_ns_fd, CLONE_NEWNS) != 0:
        fail(a.report_fd, STEP_SETNS, -1)
    # A network namespace made ahead (with its user namespace, sandbox_namespaces) is
    # joined while this launcher is still root of the runtime's user namespace.
    if a.net_ns_fd >= 0 and corral_setns(a.net_ns_fd, CLONE_NEWNET) != 0:
        fail(a.report_fd, STEP_SETNS, -1)
    # The user namespace's owner is the creator's effective uid, and the kernel charges
    # every per-user quota spent inside (inotify, mqueue bytes, namespaces) to the owner in
    # the parent namespace as well: create it as the sandbox's own host uid, not as root.
    if a.owner_uid >= 0:
        corral_lift_user_pools()
        if corral_become_owner(<unsigned int>a.owner_uid) != 0:
            fail(a.report_fd, STEP_OWNER, -1)
    # A user namespace whose helpers were started beforehand (UserNamespaceInProgress) is
    # joined, and PID 1's other namespaces are made under it while they run.
    if a.user_ns_fd >= 0:
        if corral_setns(a.user_ns_fd, CLONE_NEWUSER) != 0:
            fail(a.report_fd, STEP_SETNS, -1)
        return 0
    return CLONE_NEWUSER


cdef int init_launcher(void *arg) noexcept nogil:
    """C0: vfork child of the runtime that creates PID 1 and writes its id maps.

    PID 1 is cloned with CLONE_VM (no page tables copied) and CLONE_PARENT (it is the
    runtime's child). This launcher still has the runtime's privileges, so it writes
    uid_map/setgroups/gid_map itself (or runs newuidmap/newgidmap, or waits for those
    started earlier on the user namespace it joined), releases PID 1, and waits until PID 1 has exec'd
    corral-init (or died) before exiting: only then may the runtime run on the memory
    PID 1 was borrowing.
    """
    cdef init_args *a = <init_args *>arg
    cdef int pid
    cdef int err
    cdef int new_user
    cdef report r
    cdef int fds[2]
    # First, while this table is still the runtime's (CLONE_FILES): one of our own, with
    # only the descriptors below the cut, every one that the launcher, PID 1 and its
    # command use among them. PID 1 and the command copy this small table, not the
    # runtime's, and their execs walk only it.
    if corral_unshare_fds_below(a.fd_cut) != 0:
        fail(a.report_fd, STEP_FDS, -1)
    # The two pipes between launcher and PID 1 are made here, not by the runtime: the
    # runtime's own copy of a write end would keep the launcher from ever seeing EOF.
    if corral_pipe_cloexec(fds) != 0:
        fail(a.report_fd, STEP_CLONE, -1)
    a.go_r = fds[0]
    a.go_w = fds[1]
    if corral_pipe_cloexec(fds) != 0:
        fail(a.report_fd, STEP_CLONE, -1)
    a.exec_r = fds[0]
    a.exec_w = fds[1]
    new_user = enter_launcher_namespaces(a)
    pid = corral_vfork_clone_ns(init_main, a.init_stack_top,
                                CLONE_PARENT | new_user | CLONE_NEWPID | CLONE_NEWNS
                                | (CLONE_NEWNET if a.net_ns_fd < 0 else 0)
                                | CLONE_NEWUTS | CLONE_NEWIPC, arg)
    err = errno
    if a.owner_uid >= 0 and corral_back_to_root() != 0:
        if pid > 0:
            kill(pid, SIGKILL)
        fail(a.report_fd, STEP_OWNER, -1)
    close(a.go_r)
    close(a.exec_w)
    if pid < 0:
        corral_set_errno(err)
        fail(a.report_fd, STEP_CLONE, -1)
    r.kind = 2
    r.step = 0
    r.err = 0
    r.detail = pid
    corral_write_all(a.report_fd, <const char *>&r, sizeof(report))
    if a.maps_ready:
        pass  # a namespace made ahead, with its maps
    elif a.user_ns_fd >= 0:
        # the helpers ran while PID 1's namespaces were made: wait for what is left
        if wait_for_maps(a) != 0:
            kill(pid, SIGKILL)
            fail(a.report_fd, STEP_ID_MAPS, -1)
    elif a.uid_helper != NULL:
        # Unprivileged, with subordinate ids: the setuid helpers check /etc/subuid and
        # /etc/subgid and write the maps (and setgroups) for us.
        format_pid(a.pid_text, pid)
        run_map_helpers(a, pid)
    elif (write_proc_file(pid, "uid_map", a.uid_map, a.uid_map_len) != 0
            or write_proc_file(pid, "setgroups", "deny", 4) != 0
            or write_proc_file(pid, "gid_map", a.gid_map, a.gid_map_len) != 0):
        kill(pid, SIGKILL)
        fail(a.report_fd, STEP_ID_MAPS, -1)
    if corral_write_all(a.go_w, "g", 1) != 0:
        kill(pid, SIGKILL)
        fail(a.report_fd, STEP_WAIT_PARENT, -1)
    close(a.go_w)
    read_byte(a.exec_r)  # returns 0 at EOF: PID 1 exec'd or exited
    _exit(0)


cdef int command_main(void *arg) noexcept nogil:
    """The command: PID n of the sandbox; once its relay exits, a child of PID 1."""
    cdef join_args *a = <join_args *>arg
    cdef report r
    # Our pid inside the namespace, which is how PID 1 will report our exit.
    r.kind = 3
    r.step = 0
    r.err = 0
    r.detail = getpid()
    corral_write_all(a.report_fd, <const char *>&r, sizeof(report))
    if corral_setresuid0() != 0:
        fail(a.report_fd, STEP_SETRESUID, -1)
    contain_and_exec(a.plan, a.report_fd, False)
    return 127  # not reached: contain_and_exec execs or _exits


cdef void clone_command(join_args *a, int report_fd) noexcept nogil:
    """Clone the command (command_main) as this process's child and sleep until it has
    exec'd or failed; a failed clone is reported on report_fd (the caller's pipe)."""
    if corral_vfork_clone(command_main, a.command_stack_top, SIGCHLD, a) < 0:
        fail(report_fd, STEP_CLONE, -1)


cdef int relay_main(void *arg) noexcept nogil:
    """First process inside the sandbox's PID namespace: clones the command, then exits.

    An orphan goes to the child reaper of its *parent's* PID namespace; the join helper
    lives in the runtime's, so only a parent inside the sandbox hands the command to the
    sandbox's PID 1.
    """
    cdef join_args *a = <join_args *>arg
    clone_command(a, a.report_fd)
    _exit(0)


cdef int join_main(void *arg) noexcept nogil:
    """Helper that enters a sandbox and starts the command there as a child of PID 1.

    helper (runtime's PID ns) -> relay (sandbox's) -> command; the relay exits once the
    command has exec'd, so PID 1 adopts the command, reaps it and reports its wait status
    (corral_init.c). Commands therefore never linger as zombies the runtime must reap,
    even when the runtime itself is killed.
    """
    cdef join_args *a = <join_args *>arg
    cdef int pid
    cdef int status
    # As the launcher does: a table of our own, with only what the relay and command use.
    if corral_unshare_fds_below(a.fd_cut) != 0:
        fail(a.report_fd, STEP_FDS, -1)
    if attach_cgroups(a.plan) != 0:
        fail(a.report_fd, STEP_CGROUP_ATTACH, -1)
    if corral_setns(a.ns_pidfd, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET
                    | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP) != 0:
        fail(a.report_fd, STEP_SETNS, -1)
    # Still sharing the runtime's memory; each clone sleeps until its child execs or exits.
    pid = corral_vfork_clone(relay_main, a.relay_stack_top, SIGCHLD, arg)
    if pid < 0:
        fail(a.report_fd, STEP_CLONE, -1)
    while waitpid(pid, &status, 0) < 0 and errno == EINTR:
        pass
    _exit(0)


# --------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------

class SpawnError(OSError):
    """A child failed a containment step before execve."""

    def __init__(self, step, err, detail):
        self.step = step
        self.step_name = STEP_NAMES.get(step, f"step-{step}")
        self.detail = detail
        super().__init__(err, f"{self.step_name}: {os.strerror(err)}")


cdef int write_file(const char *path, const char *data, size_t len) noexcept nogil:
    cdef int fd = open(path, O_WRONLY | O_CLOEXEC)
    cdef int rc
    if fd < 0:
        return -1
    rc = corral_write_all(fd, data, len)
    close(fd)
    return rc


cdef object read_reports(int fd, list ns_pid=None):
    """Read every report until EOF; returns (failure or None, joined pid or 0).

    A kind-3 record (a command's pid inside its namespace) is appended to ns_pid.
    """
    cdef report r
    cdef ssize_t n
    cdef size_t got
    failure = None
    pid = 0
    while True:
        got = 0
        while got < sizeof(report):
            with nogil:
                n = read(fd, (<char *>&r) + got, sizeof(report) - got)
            if n < 0:
                if errno == EINTR:
                    continue
                raise OSError(errno, "reading the child's report pipe")
            if n == 0:
                break
            got += n
        if got == 0:
            return failure, pid
        if got != sizeof(report):
            raise OSError(5, "short report from a sandbox child")
        if r.kind == 1 and failure is None:
            failure = SpawnError(r.step, r.err, r.detail)
        elif r.kind == 2:
            pid = r.detail
        elif r.kind == 3 and ns_pid is not None:
            ns_pid.append(r.detail)


cdef int cloexec_pipe(int fds[2]) except -1:
    cdef int r = pipe(fds)
    if r != 0:
        raise OSError(errno, "pipe")
    os.set_inheritable(fds[0], False)
    os.set_inheritable(fds[1], False)
    return 0


cdef int plan_top_fd(const child_plan *p) noexcept nogil:
    """The highest descriptor number a child running plan p uses (-1: none)."""
    cdef int i, top = max(p.exec_fd, p.parent_pidfd)
    for i in range(p.n_fds):
        top = max(top, p.fds[i].parent_fd)
    for i in range(p.n_cgroup_fds):
        top = max(top, p.cgroup_fds[i])
    for i in range(p.n_ops):
        if p.ops[i].kind == OP_ATTACH:
            top = max(top, p.attach_fd if p.ops[i].plan_fd else <int>p.ops[i].flags)
    return top


def plan_fd_cut(ChildPlan plan):
    """The descriptor number below which a spawn of this plan keeps the runtime's
    descriptors in its children (fd_cut of plan_top_fd)."""
    return fd_cut(plan_top_fd(&plan.c))


cdef unsigned int fd_cut(int top) noexcept nogil:
    """Where a spawn's first child cuts the descriptor table it shares with the runtime
    (corral_unshare_fds_below): above every descriptor it or its children use (top), and
    never below 3 (stdio stays, for the map helpers' messages).

    Cut per spawn, not at a fixed number, it is right whatever the runtime holds; it is
    small because the descriptors the runtime keeps per sandbox are parked high
    (park_fd) and a spawn's own are made just before it, at the lowest free numbers."""
    return <unsigned int>max(top + 1, 3)


cdef unsigned int launch_fd_cut(init_args *a) noexcept nogil:
    """fd_cut for spawn_init's launcher: PID 1's plan, the one-shot command's, and every
    descriptor the launcher itself reads or writes."""
    cdef int top = max(plan_top_fd(a.plan), max(a.report_fd, max(a.mount_ns_fd, a.user_ns_fd)))
    top = max(top, a.net_ns_fd)
    if a.user_ns_fd >= 0 and not a.maps_ready:
        top = max(top, max(a.map_pidfds[0], a.map_pidfds[1]))
    if a.command != NULL:
        top = max(top, max(plan_top_fd(a.command.plan), a.command.report_fd))
    return fd_cut(top)


#: The lowest number park_fd moves a long-lived descriptor to (lower when RLIMIT_NOFILE
#: is small: half the soft limit).
PARK_BASE = 4096


def park_fd(int fd):
    """Move fd (close-on-exec) to the first free number at or above PARK_BASE; returns
    the descriptor to use from now on (fd itself when it cannot be moved).

    For descriptors the runtime keeps as long as a sandbox lives (PID 1's pidfd, its
    status pipe): parked there, they stay above every spawn's cut (fd_cut), so that a
    spawn's children copy O(spawn's descriptors), not O(sandboxes held)."""
    soft = getrlimit(RLIMIT_NOFILE)[0]
    base = PARK_BASE if soft == RLIM_INFINITY else min(PARK_BASE, soft // 2)
    if fd < 0 or base < 64 or fd >= base:
        return fd
    high = fcntl(fd, F_DUPFD_CLOEXEC, <int>base)
    if high < 0:
        return fd  # the parking range is full (EMFILE): still correct, only not cheap
    close(fd)
    return high


def open_tree_clone(path):
    """A detached copy of the mount tree at path (open_tree(OPEN_TREE_CLONE|AT_RECURSIVE)).

    The descriptor is opened with this process's privileges, so a child in new namespaces
    can attach it (OP_ATTACH) even where its own ids could not reach the path.
    """
    cdef bytes raw = os.fsencode(path)
    cdef int fd = corral_open_tree_clone(raw)
    if fd < 0:
        raise OSError(errno, os.strerror(errno), path)
    return fd


cdef char **helper_argv(list keep, list argv, char *pid_text) except NULL:
    """A NULL-terminated C array of argv's strings; argv[1] is replaced by pid_text
    unless that is NULL (a map helper's argv gets PID 1's pid there)."""
    cdef char **v = <char **>malloc(sizeof(char *) * (len(argv) + 1))
    cdef int i
    if v == NULL:
        raise MemoryError()
    for i, item in enumerate(argv):
        raw = os.fsencode(item) + b"\0"
        keep.append(raw)
        v[i] = pid_text if i == 1 and pid_text != NULL else <char *>raw
    v[len(argv)] = NULL
    return v


cdef int open_proc_ns(long pid, const char *leaf) except -1:
    """A close-on-exec descriptor of /proc/<pid>/<leaf> (a namespace of a holder)."""
    cdef char path[64]
    cdef int fd, err
    proc_path(path, pid, leaf)
    fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0:
        err = errno
        raise OSError(err, os.strerror(err), path.decode())
    return fd


cdef void kill_and_reap(int pid) noexcept nogil:
    """SIGKILL a child (a namespace holder, a PID 1 that failed) and reap it."""
    cdef int status = 0
    kill(pid, SIGKILL)
    while waitpid(pid, &status, 0) < 0 and errno == EINTR:
        pass


cdef int write_id_maps(int pid, bytes uid_map, bytes gid_map) except -1:
    """Write a holder's uid_map, setgroups ("deny") and gid_map, as root.

    Raises:
        OSError: a write failed (filename: the file).
    """
    cdef int err
    for leaf, data in ((b"uid_map", uid_map), (b"setgroups", b"deny"), (b"gid_map", gid_map)):
        if write_proc_file(pid, leaf, data, len(data)) != 0:
            err = errno
            raise OSError(err, os.strerror(err), f"/proc/{pid}/{leaf.decode()}")
    return 0


def userns_with_maps(bytes uid_map, bytes gid_map):
    """A descriptor of a new user namespace with these id maps (for an idmapped mount).

    A holder process is cloned into the namespace (sharing this address space, on its own
    stack, every signal blocked), the maps are written, its ns/user is opened, and it is
    killed and reaped. Needs CAP_SETUID/CAP_SETGID over the mapped host ids (root).

    Raises:
        OSError: clone, a map write or the open failed (filename says which file).
    """
    cdef void *stack = corral_stack_alloc()
    cdef sigset_t old_mask
    cdef int pid, err = 0, fd = -1
    if stack == NULL:
        raise MemoryError("stack for the user namespace holder")
    try:
        with nogil:
            corral_block_signals(&old_mask)
            pid = corral_clone_userns_holder(corral_stack_top(stack))
            err = errno
            corral_restore_signals(&old_mask)
        if pid < 0:
            raise OSError(err, "clone(CLONE_NEWUSER): " + os.strerror(err))
        try:
            write_id_maps(pid, uid_map, gid_map)
            fd = open_proc_ns(pid, "ns/user")
        finally:
            with nogil:
                kill_and_reap(pid)
    finally:
        corral_stack_free(stack)
    return fd


def sandbox_namespaces(bytes uid_map, bytes gid_map, long owner_uid=-1):
    """(user namespace fd, network namespace fd): a new user namespace with these id maps
    and a network namespace it owns, made ahead of a sandbox's PID 1, which joins both
    (spawn_init's namespaces=) instead of creating them on its start's path.

    They are made exactly as spawn_init's launcher makes PID 1's: by a holder cloned with
    the owner's effective uid (owner_uid >= 0, the sandbox's host uid) and the per-user
    limits lifted, sharing this address space, every signal blocked. The maps are written,
    both descriptors opened, and the holder killed and reaped: nothing ever ran inside.
    Needs root.

    Raises:
        OSError: a clone, a map write or an open failed (filename says which file).
    """
    cdef void *launcher_stack = corral_stack_alloc()
    cdef void *holder_stack = corral_stack_alloc()
    cdef corral_ns_launch launch
    cdef sigset_t old_mask
    cdef int pid, err = 0, user_fd = -1, net_fd = -1
    try:
        if launcher_stack == NULL or holder_stack == NULL:
            raise MemoryError("stacks for the namespace holder")
        launch.holder_stack_top = corral_stack_top(holder_stack)
        launch.owner_uid = owner_uid
        with nogil:
            corral_block_signals(&old_mask)
            pid = corral_make_sandbox_namespaces(corral_stack_top(launcher_stack), &launch)
            err = errno
            corral_restore_signals(&old_mask)
        if pid < 0:
            raise OSError(err, "clone(CLONE_NEWUSER | CLONE_NEWNET): " + os.strerror(err))
        try:
            write_id_maps(pid, uid_map, gid_map)
            user_fd = open_proc_ns(pid, "ns/user")
            net_fd = open_proc_ns(pid, "ns/net")
        except BaseException:
            if user_fd >= 0:
                close(user_fd)
            raise
        finally:
            with nogil:
                kill_and_reap(pid)
    finally:
        corral_stack_free(launcher_stack)
        corral_stack_free(holder_stack)
    return user_fd, net_fd


cdef class UserNamespaceInProgress:
    """A new user namespace that newuidmap and newgidmap are mapping while the caller goes
    on preparing the sandbox (an unprivileged caller with subordinate ids).

    Each helper is a setuid program that costs about 2 ms to start, and PID 1 can do
    little before its maps exist (a file it creates needs a mapped owner: EOVERFLOW), so
    run by the launcher after PID 1's clone they were on every create's path. Started
    here first, on a namespace held by a process cloned into it (sharing this address
    space and descriptor table, every signal blocked), they run while the runtime makes
    the sandbox's directories, plans and descriptors, and while the launcher makes PID 1's
    other namespaces in this one (spawn_init(user_namespace=...)); the launcher waits for
    them (their pidfds) only then. close() waits for them and ends the holder.

    Raises (constructor):
        OSError: the holder could not be cloned.
    """

    cdef int holder
    cdef int helper_pids[2]
    cdef int helper_pidfds[2]   # what the launcher waits on (it is not their parent)
    cdef int helper_status[2]   # wait statuses, once waited for (-1: never started)
    cdef int helper_errno
    cdef void *stack
    cdef void *helper_stacks[2]
    cdef char **helper_argvs[2]
    cdef char pid_text[24]
    cdef list keep

    def __cinit__(self):
        self.holder = -1
        self.helper_pids[0] = self.helper_pids[1] = -1
        self.helper_pidfds[0] = self.helper_pidfds[1] = -1
        self.helper_status[0] = self.helper_status[1] = -1
        self.keep = []

    def __init__(self, uid_helper, gid_helper):
        """uid_helper, gid_helper: argv of newuidmap and newgidmap (argv[1], the pid, is
        the holder's)."""
        cdef sigset_t old_mask
        cdef int err = 0, i
        try:
            self.stack = corral_stack_alloc()
            self.helper_stacks[0] = corral_stack_alloc()
            self.helper_stacks[1] = corral_stack_alloc()
            if self.stack == NULL or self.helper_stacks[0] == NULL or self.helper_stacks[1] == NULL:
                raise MemoryError("stacks for the user namespace holder and its helpers")
            with nogil:
                corral_block_signals(&old_mask)
                self.holder = corral_clone_shared_userns_holder(corral_stack_top(self.stack))
                err = errno
                corral_restore_signals(&old_mask)
            if self.holder < 0:
                raise OSError(err, "clone(CLONE_NEWUSER): " + os.strerror(err))
            format_pid(self.pid_text, self.holder)
            self.helper_argvs[0] = helper_argv(self.keep, list(uid_helper), self.pid_text)
            self.helper_argvs[1] = helper_argv(self.keep, list(gid_helper), self.pid_text)
            with nogil:
                corral_block_signals(&old_mask)
                for i in range(2):
                    self.helper_pids[i] = corral_start_helper(
                        self.helper_argvs[i], corral_stack_top(self.helper_stacks[i]))
                    if self.helper_pids[i] < 0:
                        self.helper_errno = errno
                    else:
                        self.helper_pidfds[i] = corral_pidfd_open(self.helper_pids[i])
                corral_restore_signals(&old_mask)
        except BaseException:
            self.close()
            raise

    cdef int lend(self, init_args *args) except -1:
        """Give the launcher the namespace (a descriptor spawn_init closes) and the
        helpers' pidfds to wait on."""
        args.user_ns_fd = open_proc_ns(self.holder, "ns/user")
        args.map_pidfds[0] = self.helper_pidfds[0]
        args.map_pidfds[1] = self.helper_pidfds[1]
        return 0

    cdef object explain(self, failure):
        """failure, or for the launcher's "maps not written" the SpawnError naming the
        helper that failed (STEP_ID_MAPS; detail = which helper << 16 | its wait status,
        0xffff when it could not be started), once both have been waited for."""
        cdef int i, err
        if not isinstance(failure, SpawnError) or failure.step != STEP_ID_MAPS:
            return failure
        self.wait_helpers()
        for i in range(2):
            if self.helper_status[i] != 0:
                err = 1 if self.helper_status[i] > 0 else self.helper_errno  # EPERM
                return SpawnError(STEP_ID_MAPS, err,
                                  ((i + 1) << 16) | (self.helper_status[i] & 0xffff))
        return failure

    cdef void wait_helpers(self) noexcept nogil:
        cdef int i
        for i in range(2):
            if self.helper_pids[i] > 0:  # setuid: ours to wait for, not to kill
                self.helper_status[i] = corral_wait_status(self.helper_pids[i])
                self.helper_pids[i] = -1
            if self.helper_pidfds[i] >= 0:
                close(self.helper_pidfds[i])
                self.helper_pidfds[i] = -1

    def close(self):
        """End the holder (and wait for helpers still running); idempotent."""
        cdef int i
        with nogil:
            self.wait_helpers()
            if self.holder > 0:
                kill_and_reap(self.holder)
                self.holder = -1
        # only now that no helper can still be on them (waited above)
        for i in range(2):
            corral_stack_free(self.helper_stacks[i])
            self.helper_stacks[i] = NULL
            free(self.helper_argvs[i])
            self.helper_argvs[i] = NULL
        corral_stack_free(self.stack)
        self.stack = NULL

    def __dealloc__(self):
        self.close()


def mount_namespace_without(detach):
    """A descriptor of a new mount namespace: a private copy of this process's, with the
    mount points in detach (paths, each the top of what goes) detached in it.

    The copy is made by a holder process cloned into it (sharing this address space, on
    its own stack, every signal blocked), which makes its tree private and detaches the
    paths; its ns/mnt is opened and it is killed and reaped. The namespace lives as long
    as the descriptor. Needs CAP_SYS_ADMIN (root).

    Raises:
        OSError: clone, a step in the holder (filename: the path) or the open failed.
    """
    cdef void *stack = corral_stack_alloc()
    cdef sigset_t old_mask
    cdef corral_mntns_holder holder
    cdef int pid, err = 0, fd = -1
    cdef int ready[2]
    cdef list keep = []
    if stack == NULL:
        raise MemoryError("stack for the mount namespace holder")
    ready[0] = ready[1] = -1
    detach = list(detach)
    holder.detach = NULL
    try:
        holder.detach = helper_argv(keep, detach, NULL)
        cloexec_pipe(ready)
        holder.ready_w = ready[1]
        with nogil:
            corral_block_signals(&old_mask)
            pid = corral_clone_mntns_holder(corral_stack_top(stack), &holder)
            err = errno
            corral_restore_signals(&old_mask)
        close(ready[1])
        ready[1] = -1
        if pid < 0:
            raise OSError(err, "clone(CLONE_NEWNS): " + os.strerror(err))
        try:
            if read_byte(ready[0]) != 1:
                raise OSError(5, "the mount namespace holder exited before it was ready")
            if holder.err != 0:
                what = "/" if holder.failed < 0 else detach[holder.failed]
                step = "mount(MS_REC|MS_PRIVATE)" if holder.failed < 0 else "umount2(MNT_DETACH)"
                raise OSError(holder.err, f"{step}: {os.strerror(holder.err)}", what)
            fd = open_proc_ns(pid, "ns/mnt")
        finally:
            with nogil:
                kill_and_reap(pid)
    finally:
        for end in (ready[0], ready[1]):
            if end >= 0:
                close(end)
        free(holder.detach)
        corral_stack_free(stack)
    return fd


def idmap_tree(int tree_fd, int userns_fd, unsigned long long attrs=0, bint recursive=True):
    """Idmap a detached mount tree (from open_tree_clone) through userns_fd's maps,
    setting the MOUNT_ATTR_* bits attrs too, on every mount in it (recursive) or its top.

    Raises:
        OSError: mount_setattr failed (EINVAL: a filesystem in the tree cannot be idmapped).
    """
    if corral_idmap_tree(tree_fd, userns_fd, attrs, recursive) != 0:
        raise OSError(errno, os.strerror(errno))


cdef struct launch_stacks:
    void *launcher
    void *init
    void *uid_helper    # the id map helpers' (NULL: none)
    void *gid_helper
    void *command       # the one-shot command's (NULL: none)


cdef void free_launch_stacks(launch_stacks *stacks) noexcept:
    corral_stack_free(stacks.launcher)
    corral_stack_free(stacks.init)
    corral_stack_free(stacks.uid_helper)
    corral_stack_free(stacks.gid_helper)
    corral_stack_free(stacks.command)


cdef int lend_map_helpers(init_args *args, launch_stacks *stacks, list keep,
                          map_helpers) except -1:
    """Have the launcher run map_helpers (newuidmap argv, newgidmap argv), each on a stack
    of its own; their argv[1] is args.pid_text, which the launcher fills with PID 1's pid."""
    stacks.uid_helper = corral_stack_alloc()
    stacks.gid_helper = corral_stack_alloc()
    if stacks.uid_helper == NULL or stacks.gid_helper == NULL:
        raise MemoryError("stacks for the id map helpers")
    args.helper_stack_top = corral_stack_top(stacks.uid_helper)
    args.helper2_stack_top = corral_stack_top(stacks.gid_helper)
    args.uid_helper = helper_argv(keep, list(map_helpers[0]), args.pid_text)
    args.gid_helper = helper_argv(keep, list(map_helpers[1]), args.pid_text)
    return 0


cdef object clone_and_report(int (*fn)(void *) noexcept nogil, void *stack, void *arg,
                             int *rep, int *status, str what, list ns_pid=None):
    """Run fn as a vfork-style clone on stack (every signal blocked in this thread while it
    borrows the address space), sharing this process's descriptor table until fn's first
    act gives it one of its own (corral_unshare_fds_below), and read its reports from the
    pipe rep until EOF; returns read_reports' (failure or None, pid). Closes both ends of
    rep (setting them to -1) and waits for the clone to exit, its wait status in *status.

    Raises:
        OSError: the clone failed ("clone (<what>)"), or reading the reports did.
    """
    cdef sigset_t old_mask
    cdef int child, err
    with nogil:
        corral_block_signals(&old_mask)
        child = corral_vfork_clone(fn, corral_stack_top(stack), SIGCHLD | CLONE_FILES, arg)
        err = errno
        corral_restore_signals(&old_mask)
    close(rep[1])
    rep[1] = -1
    if child < 0:
        raise OSError(err, f"clone ({what})")
    try:
        return read_reports(rep[0], ns_pid)
    finally:
        close(rep[0])
        rep[0] = -1
        with nogil:
            while waitpid(child, status, 0) < 0 and errno == EINTR:
                pass


cdef tuple settle_init(failure, pid, int status, UserNamespaceInProgress user_namespace):
    """(pid, pidfd) of the PID 1 the launcher reported; when it reported a failure (or no
    PID 1, or its pidfd cannot be opened), PID 1 is killed and reaped and that is raised."""
    cdef pid_t child = pid
    if user_namespace is not None and failure is not None:
        failure = user_namespace.explain(failure)
    if failure is None and not child:
        failure = OSError(5, f"sandbox launcher exited ({status:#x}) without creating PID 1")
    if failure is None:
        pidfd = corral_pidfd_open(child)
        if pidfd >= 0:
            return pid, park_fd(pidfd)
        failure = OSError(errno, "pidfd_open")
    if child:
        with nogil:
            kill_and_reap(child)
    raise failure


def spawn_init(ChildPlan plan, bytes uid_map, bytes gid_map, long owner_uid=-1,
               map_helpers=None, int mount_ns_fd=-1,
               UserNamespaceInProgress user_namespace=None, ChildPlan command=None,
               tuple namespaces=None):
    """Create a sandbox's PID 1; returns (pid, pidfd), or (pid, pidfd, started) with a
    command.

    A vfork-style launcher clones PID 1 into new user, PID, mount, network, UTS and IPC
    namespaces, writes its uid/gid maps and releases it; PID 1 contains itself and execs
    corral-init. Neither clone copies the runtime's page tables. With owner_uid >= 0 the
    launcher creates the user namespace with that effective uid (the namespace's owner,
    charged for its per-user quotas), then returns to root to write the maps. With
    map_helpers = (newuidmap argv, newgidmap argv) the launcher runs those instead (argv[1]
    becomes PID 1's pid): how an unprivileged caller maps its subordinate ids. With
    mount_ns_fd >= 0 the launcher joins that mount namespace first (root: the base
    namespace of mount_namespace_without), so PID 1's is a copy of it, not of the runtime's.
    With user_namespace (its helpers started earlier) the launcher joins that namespace,
    makes PID 1's other namespaces in it and then waits for the helpers: uid_map, gid_map
    and map_helpers are not used.
    With namespaces = (user namespace fd, network namespace fd) from sandbox_namespaces,
    whose maps are written, the launcher joins both and makes PID 1's other namespaces in
    them: uid_map, gid_map, owner_uid and map_helpers are not used. spawn_init closes both
    descriptors, whatever the outcome (each pair starts one sandbox).

    With command (a ChildPlan built as spawn_join's), PID 1 clones that command as its own
    child once its mounts are in place, and only then contains itself and execs
    corral-init; the command contains itself exactly as a joined one (it has no cgroup
    descriptors to write: it is born in PID 1's cgroup). It reports on a pipe of its own,
    so `started` is its pid inside the sandbox, or the SpawnError it failed with (PID 1
    is up then and reaps it: the caller decides, as after a failed spawn_join).

    Raises:
        SpawnError: PID 1 failed a step (step, errno, detail are attributes).
        OSError: clone itself failed.
    """
    cdef int rep[2]
    cdef int cmd_rep[2]
    cdef int status = 0
    cdef init_args args
    cdef join_args cmd_args
    cdef launch_stacks stacks
    cdef char pid_text[24]
    cdef list keep = []
    start_launch(&args, &stacks, pid_text, command is not None)
    rep[0] = rep[1] = cmd_rep[0] = cmd_rep[1] = -1
    try:
        if map_helpers is not None:
            lend_map_helpers(&args, &stacks, keep, map_helpers)
        cloexec_pipe(rep)
        plan.c.parent_pidfd = corral_pidfd_open(getpid()) if plan.c.pdeathsig else -1
        args.plan = &plan.c
        args.report_fd = rep[1]
        args.init_stack_top = corral_stack_top(stacks.init)
        args.uid_map = uid_map
        args.uid_map_len = len(uid_map)
        args.gid_map = gid_map
        args.gid_map_len = len(gid_map)
        args.owner_uid = owner_uid
        args.mount_ns_fd = mount_ns_fd
        if namespaces is not None:
            args.user_ns_fd, args.net_ns_fd = namespaces
            args.maps_ready = 1
            args.owner_uid = -1
        elif user_namespace is not None:
            user_namespace.lend(&args)
        if command is not None:
            cloexec_pipe(cmd_rep)
            lend_command(&args, &cmd_args, command, cmd_rep[1], stacks.command)
        args.fd_cut = launch_fd_cut(&args)
        failure, pid = clone_and_report(init_launcher, stacks.launcher, &args, rep, &status,
                                        "sandbox launcher")
        if command is not None:
            started = command_started(cmd_rep)
    finally:
        if namespaces is not None and args.user_ns_fd < 0:  # not lent to the launcher
            args.user_ns_fd, args.net_ns_fd = namespaces
        for fd in (rep[0], rep[1], cmd_rep[0], cmd_rep[1], plan.c.parent_pidfd,
                   args.user_ns_fd, args.net_ns_fd):
            if fd >= 0:
                close(fd)
        plan.c.parent_pidfd = -1
        free_launch_stacks(&stacks)
        free(args.uid_helper)
        free(args.gid_helper)
    pid, pidfd = settle_init(failure, pid, status, user_namespace)
    return (pid, pidfd) if command is None else (pid, pidfd, started)


cdef int start_launch(init_args *args, launch_stacks *stacks, char *pid_text,
                      bint with_command) except -1:
    """The stacks of the launcher and PID 1 (and of a one-shot command), and the fields of
    args that stay unset unless spawn_init's options set them."""
    stacks.launcher = corral_stack_alloc()
    stacks.init = corral_stack_alloc()
    stacks.uid_helper = stacks.gid_helper = NULL
    stacks.command = corral_stack_alloc() if with_command else NULL
    if stacks.launcher == NULL or stacks.init == NULL or (
            with_command and stacks.command == NULL):
        free_launch_stacks(stacks)
        raise MemoryError("stacks for the sandbox launcher")
    args.command = NULL
    args.user_ns_fd = -1
    args.maps_ready = 0
    args.net_ns_fd = -1
    args.uid_helper = args.gid_helper = NULL
    args.pid_text = pid_text
    args.helper_stack_top = args.helper2_stack_top = NULL
    return 0


cdef object command_started(int cmd_rep[2]):
    """The one-shot command's pid inside the sandbox, or the error it failed a step with,
    from its report pipe. The launcher has returned, so PID 1 exec'd, which it did only
    after the command had exec'd or failed: every report is in the pipe already."""
    cdef list ns_pid = []
    close(cmd_rep[1])
    cmd_rep[1] = -1
    failure, _ = read_reports(cmd_rep[0], ns_pid)
    if failure is not None:
        return failure
    return ns_pid[0] if ns_pid else OSError(
        5, "PID 1 exec'd without starting the sandbox's command")


cdef int lend_command(init_args *args, join_args *cmd_args, ChildPlan command, int report_fd,
                      void *stack) except -1:
    """Have PID 1 start command (spawn_init command=) on stack, reporting on report_fd."""
    cmd_args.plan = &command.c
    cmd_args.ns_pidfd = -1
    cmd_args.report_fd = report_fd
    cmd_args.relay_stack_top = NULL
    cmd_args.fd_cut = 0  # PID 1 clones it with a copy of the launcher's table already cut
    cmd_args.command_stack_top = corral_stack_top(stack)
    args.command = cmd_args
    return 0


def spawn_join(ChildPlan plan, int init_pidfd):
    """Start plan.argv inside the sandbox whose PID 1 is behind init_pidfd.

    Returns the command's pid inside the sandbox. The command is a child of the
    sandbox's PID 1, which reaps it and reports its wait status on the status pipe.

    The helper, relay and command are vfork-style clones: none copies the runtime's page
    tables, so the cost does not grow with the runtime's memory. Every signal is blocked
    in this thread while they borrow its address space; the command restores defaults.

    Raises:
        SpawnError: a step failed (execve's failure is step "execve").
    """
    cdef int rep[2]
    cdef int status = 0
    cdef join_args args
    cdef list ns_pid = []
    cdef void *helper_stack = corral_stack_alloc()
    cdef void *relay_stack = corral_stack_alloc()
    cdef void *command_stack = corral_stack_alloc()
    if helper_stack == NULL or relay_stack == NULL or command_stack == NULL:
        corral_stack_free(helper_stack)
        corral_stack_free(relay_stack)
        corral_stack_free(command_stack)
        raise MemoryError("stacks for the join helper")
    cdef int low_pidfd = -1
    rep[0] = rep[1] = -1
    try:
        cloexec_pipe(rep)
        # PID 1's pidfd is parked high (park_fd): a copy at the lowest free number, so
        # that the helper's cut (fd_cut) stays low and the table it copies small
        low_pidfd = fcntl(init_pidfd, F_DUPFD_CLOEXEC, 3)
        if low_pidfd < 0:
            raise OSError(errno, "fcntl(F_DUPFD_CLOEXEC) of PID 1's pidfd")
        args.plan = &plan.c
        args.ns_pidfd = low_pidfd
        args.report_fd = rep[1]
        args.fd_cut = fd_cut(max(plan_top_fd(&plan.c), max(low_pidfd, rep[1])))
        args.relay_stack_top = corral_stack_top(relay_stack)
        args.command_stack_top = corral_stack_top(command_stack)
        failure, _ = clone_and_report(join_main, helper_stack, &args, rep, &status,
                                      "join helper", ns_pid)
    finally:
        for fd in (rep[0], rep[1], low_pidfd):
            if fd >= 0:
                close(fd)
        corral_stack_free(helper_stack)
        corral_stack_free(relay_stack)
        corral_stack_free(command_stack)
    if failure is not None:
        raise failure  # the failed command exits; PID 1 reaps it
    if not ns_pid:
        raise OSError(5, f"join helper exited ({status:#x}) without starting the command")
    return ns_pid[0]
