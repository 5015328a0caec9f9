"""What a sandbox may call: the syscall tables of the default seccomp profile, as data.

The names Docker 20.10's default profile allows a container without
capabilities, grouped by what they do; the conditions on the calls it allows
only in part (``clone``'s namespace flags, ``personality``'s values,
``fcntl``'s commands); what this project refuses on top and why; and the
clause types (:class:`Arg`, :class:`Clause`) that both the default and a
policy's own profile are expressed in. :mod:`executor.policy.seccomp` turns
these into profiles; the reasons are in its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

# -- what a sandbox may call -------------------------------------------------------

# Grouped by what they serve. The 32-bit variants (fstat64, chown32, ...) serve
# the i386, x32 and arm ABIs that the profile admits beside the native one, as
# Docker's does.
_FILES = """
access faccessat faccessat2 chdir fchdir getcwd umask
open openat openat2 creat close close_range dup dup2 dup3
read readv pread64 preadv preadv2 write writev pwrite64 pwritev pwritev2
lseek _llseek readahead fadvise64 fadvise64_64 fallocate
copy_file_range sendfile sendfile64 splice tee vmsplice
truncate truncate64 ftruncate ftruncate64 fsync fdatasync sync syncfs sync_file_range
stat stat64 lstat lstat64 fstat fstat64 fstatat64 newfstatat statx
statfs statfs64 fstatfs fstatfs64
getdents getdents64 mkdir mkdirat mknod mknodat rmdir
link linkat symlink symlinkat readlink readlinkat unlink unlinkat rename renameat renameat2
chmod fchmod fchmodat chown chown32 fchown fchown32 fchownat lchown lchown32
utime utimes utimensat utimensat_time64 futimesat
getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr
setxattr lsetxattr fsetxattr removexattr lremovexattr fremovexattr
ioctl fanotify_mark inotify_rm_watch
io_setup io_destroy io_submit io_cancel io_getevents io_pgetevents io_pgetevents_time64
ioprio_get ioprio_set
"""
_WAITING = """
poll ppoll ppoll_time64 select _newselect pselect6 pselect6_time64
epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_wait epoll_wait_old epoll_pwait epoll_pwait2
eventfd eventfd2 signalfd signalfd4
timerfd_create timerfd_settime timerfd_settime64 timerfd_gettime timerfd_gettime64
"""
_PROCESSES = """
fork vfork execve execveat exit exit_group wait4 waitid waitpid
getpid getppid gettid getpgid getpgrp setpgid getsid setsid
kill tkill tgkill pidfd_open pidfd_send_signal process_mrelease
set_tid_address set_robust_list get_robust_list rseq restart_syscall
futex futex_time64 futex_waitv membarrier
get_thread_area set_thread_area prctl seccomp
landlock_create_ruleset landlock_add_rule landlock_restrict_self
getpriority setpriority getcpu
sched_yield sched_getaffinity sched_setaffinity sched_getattr sched_setattr
sched_getparam sched_setparam sched_getscheduler sched_setscheduler
sched_get_priority_max sched_get_priority_min sched_rr_get_interval sched_rr_get_interval_time64
getrlimit ugetrlimit setrlimit prlimit64 getrusage times sysinfo uname
capget capset
"""
_IDENTITY = """
getuid getuid32 geteuid geteuid32 getgid getgid32 getegid getegid32
getresuid getresuid32 getresgid getresgid32 getgroups getgroups32
setuid setuid32 setgid setgid32 setreuid setreuid32 setregid setregid32
setresuid setresuid32 setresgid setresgid32 setgroups setgroups32
setfsuid setfsuid32 setfsgid setfsgid32
"""
_MEMORY = """
brk mmap mmap2 munmap mremap mprotect madvise mincore msync remap_file_pages
mlock mlock2 mlockall munlock munlockall memfd_create memfd_secret
"""
_SIGNALS_AND_TIME = """
rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigsuspend rt_sigqueueinfo
rt_tgsigqueueinfo rt_sigtimedwait rt_sigtimedwait_time64
sigaltstack sigprocmask sigreturn pause alarm getitimer setitimer
time gettimeofday clock_gettime clock_gettime64 clock_getres clock_getres_time64
clock_nanosleep clock_nanosleep_time64 nanosleep adjtimex clock_adjtime clock_adjtime64
timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64
getrandom
"""
_SOCKETS_AND_IPC = """
socket socketpair socketcall bind listen accept accept4 connect shutdown
getsockname getpeername getsockopt setsockopt
send sendto sendmsg sendmmsg recv recvfrom recvmsg recvmmsg recvmmsg_time64
pipe pipe2 ipc
msgget msgsnd msgrcv msgctl semget semop semtimedop semtimedop_time64 semctl
shmget shmat shmdt shmctl
mq_open mq_unlink mq_timedsend mq_timedsend_time64 mq_timedreceive mq_timedreceive_time64
mq_notify mq_getsetattr
"""
# Allowed with any arguments, on every architecture.
ALLOWED: frozenset[str] = frozenset(
    " ".join((_FILES, _WAITING, _PROCESSES, _IDENTITY, _MEMORY, _SIGNALS_AND_TIME, _SOCKETS_AND_IPC)).split()
)

# clone() may make threads and processes, never namespaces.
CLONE_NEWNS = 0x0002_0000
CLONE_NEWCGROUP = 0x0200_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000
CLONE_NAMESPACES = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)
# personality(): Linux, its 32-bit and uname-2.6 variants, and the query (0xffffffff).
PER_LINUX, PER_LINUX32, UNAME26, PERSONALITY_QUERY = 0x0, 0x8, 0x0002_0000, 0xFFFF_FFFF
PERSONALITIES = (PER_LINUX, PER_LINUX32, UNAME26, UNAME26 | PER_LINUX32, PERSONALITY_QUERY)
EPERM = 1
ENOSYS = 38

FCNTL_NAMES = ("fcntl", "fcntl64")
# The fcntl commands a sandbox may use (Linux's numbers, the same on every
# architecture): descriptors, status flags, signal-driven I/O, pipe sizes,
# seals, write hints, and the two queries of Linux 6.10 and 6.12.
FCNTL_ALLOWED: Mapping[int, str] = {
    0: "F_DUPFD",
    1: "F_GETFD",
    2: "F_SETFD",
    3: "F_GETFL",
    4: "F_SETFL",
    8: "F_SETOWN",
    9: "F_GETOWN",
    10: "F_SETSIG",
    11: "F_GETSIG",
    15: "F_SETOWN_EX",
    16: "F_GETOWN_EX",
    17: "F_GETOWNER_UIDS",
    1027: "F_DUPFD_QUERY",
    1028: "F_CREATED_QUERY",
    1030: "F_DUPFD_CLOEXEC",
    1031: "F_SETPIPE_SZ",
    1032: "F_GETPIPE_SZ",
    1033: "F_ADD_SEALS",
    1034: "F_GET_SEALS",
    1035: "F_GET_RW_HINT",
    1036: "F_SET_RW_HINT",
    1037: "F_GET_FILE_RW_HINT",
    1038: "F_SET_FILE_RW_HINT",
}
# What the allow-list leaves out on purpose, for messages and tests (the
# 32-bit ABIs' F_GETLK64..F_SETLKW64 are 12-14).
FCNTL_REFUSED: Mapping[int, str] = {
    5: "F_GETLK",
    6: "F_SETLK",
    7: "F_SETLKW",
    12: "F_GETLK64",
    13: "F_SETLK64",
    14: "F_SETLKW64",
    36: "F_OFD_GETLK",
    37: "F_OFD_SETLK",
    38: "F_OFD_SETLKW",
    1024: "F_SETLEASE",
    1025: "F_GETLEASE",
    1026: "F_NOTIFY",
}
_LOCKS = "a lock on a data view's file holds the operator's own inode"
_WATCHES = "a watch on a data view's file sees the operator's and other tasks' every access"
_IO_URING = "io_uring is a large kernel surface; later Docker releases refuse it by default"
# Calls Docker 20.10's default allows and this one refuses, and why.
REFUSED: Mapping[str, str] = {
    "flock": _LOCKS,
    "inotify_init": _WATCHES,
    "inotify_init1": _WATCHES,
    "inotify_add_watch": _WATCHES,
    "io_uring_setup": _IO_URING,
    "io_uring_enter": _IO_URING,
    "io_uring_register": _IO_URING,
}

EQ, MASKED_EQ = "SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ"
OPS = ("SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", EQ, "SCMP_CMP_GE", "SCMP_CMP_GT", MASKED_EQ)


@dataclass(frozen=True)
class Arg:
    """One condition on a call's argument, as Docker's profiles write it.

    ``SCMP_CMP_MASKED_EQ`` holds when ``arg & value == value_two``; the others
    compare ``arg`` with ``value`` (unsigned, all 64 bits).
    """

    index: int
    value: int
    op: str = EQ
    value_two: int = 0

    def holds(self, arg: int) -> bool:
        """Whether an argument equal to ``arg`` meets the condition."""
        if self.op == MASKED_EQ:
            return arg & self.value == self.value_two
        return {
            "SCMP_CMP_NE": arg != self.value,
            "SCMP_CMP_LT": arg < self.value,
            "SCMP_CMP_LE": arg <= self.value,
            "SCMP_CMP_EQ": arg == self.value,
            "SCMP_CMP_GE": arg >= self.value,
            "SCMP_CMP_GT": arg > self.value,
        }[self.op]

    def to_json(self) -> dict[str, Any]:
        """Docker's form."""
        return {"index": self.index, "value": self.value, "valueTwo": self.value_two, "op": self.op}


@dataclass(frozen=True)
class Clause:
    """One way the default allows a call: all of ``args``, on ``arches`` (None: all), from ``min_kernel``."""

    args: tuple[Arg, ...] = ()
    arches: tuple[str, ...] | None = None
    min_kernel: str | None = None


_ANY = (Clause(),)
# gVisor looks a profile's names up in its own syscall table, which names a
# few calls differently from libseccomp; a name it does not know it skips, so
# under runsc a rule names a call both ways. (glibc's select() is pselect6.)
GVISOR_NAMES = {"pselect6": "pselect"}


def allowed_clauses(runtime: str) -> dict[str, tuple[Clause, ...]]:
    """Every call the default allows under ``runtime``, with the ways it allows it."""
    table: dict[str, tuple[Clause, ...]] = dict.fromkeys(ALLOWED, _ANY)
    # Before 4.8 a traced process could skip its seccomp checks.
    table["ptrace"] = (Clause(min_kernel="4.8"),)
    table["personality"] = tuple(Clause((Arg(0, value),)) for value in PERSONALITIES)
    table["clone"] = (Clause((Arg(0, CLONE_NAMESPACES, MASKED_EQ, 0),)),)
    for name in FCNTL_NAMES:
        table[name] = tuple(Clause((Arg(1, cmd),)) for cmd in FCNTL_ALLOWED)
    table["arch_prctl"] = (Clause(arches=("amd64", "x32")),)
    table["modify_ldt"] = (Clause(arches=("amd64", "x32", "x86")),)
    for name in (
        "arm_fadvise64_64",
        "arm_sync_file_range",
        "sync_file_range2",
        "breakpoint",
        "cacheflush",
        "set_tls",
    ):
        table[name] = (Clause(arches=("arm", "arm64")),)
    if runtime == "runsc":
        table["clone3"] = _ANY  # gVisor answers ENOSYS itself (see the module's docstring)
        for name, gvisor_name in GVISOR_NAMES.items():
            table[gvisor_name] = table[name]
    return table
