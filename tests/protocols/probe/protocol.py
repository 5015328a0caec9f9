"""Security probes, run as protocol code inside the sandbox.

Each probe tries something a hostile protocol would try and reports whether
the sandbox held: ``(held, detail)``, or ``(None, detail)`` when the check does
not apply to the runtime it finds itself in (gVisor runs its own kernel, so
some runc facts, such as the NoNewPrivs line or the seccomp mode in
``/proc/self/status``, say nothing there). The test keeps a short allow-list
of which probes may not apply under which runtime.

``run`` returns::

    {"runtime": "runc" | "runsc", "evidence": str, "kernel": str, "machine": str,
     "probes": {name: {"held": bool | None, "detail": str, "applies": bool}}}

``runtime`` is judged from inside (gVisor's kernel log names it); ``kernel`` is
``/proc/version``, for the test to compare with the host's.

Parameters tell the probes the policy's caps: ``pids``, ``memory_mb``,
``nofile``, ``tmpfs_mb``; ``parent_is_root`` says whether the parent handed the
token to the sandbox uid alone; ``only`` (a list of names) runs just those
probes, for debugging. With ``{"mode": "memory_hog"}`` it instead pushes the
memory cap past its limit, for the test to check the outcome from outside (the
fork bomb is its own protocol, ``tests/protocols/fork_bomb``).

Probes read local state or act on the container's own namespaces only; none
sends traffic anywhere. Anything that could change the sandbox's own process
(namespaces, mounts, ptrace) runs in a forked child.
"""

import array
import contextlib
import ctypes
import errno
import fcntl
import fnmatch
import glob
import ipaddress
import json
import os
import platform
import re
import resource
import select
import signal
import socket
import stat
import subprocess
import sys
import time

MIB = 1024 * 1024

# Raw syscall numbers: the probes call the kernel directly, not libc wrappers
# that might short-circuit.
SYSCALLS = {
    "x86_64": {
        "ptrace": 101,
        "syslog": 103,
        "mount": 165,
        "init_module": 175,
        "delete_module": 176,
        "kexec_load": 246,
        "add_key": 248,
        "request_key": 249,
        "keyctl": 250,
        "unshare": 272,
        "perf_event_open": 298,
        "open_by_handle_at": 304,
        "setns": 308,
        "finit_module": 313,
        "kexec_file_load": 320,
        "bpf": 321,
        "userfaultfd": 323,
    },
    "aarch64": {
        "mount": 40,
        "unshare": 97,
        "kexec_load": 104,
        "init_module": 105,
        "delete_module": 106,
        "syslog": 116,
        "ptrace": 117,
        "add_key": 217,
        "request_key": 218,
        "keyctl": 219,
        "perf_event_open": 241,
        "open_by_handle_at": 265,
        "setns": 268,
        "finit_module": 273,
        "bpf": 280,
        "userfaultfd": 282,
        "kexec_file_load": 294,
    },
}
SYSCALLS["amd64"] = SYSCALLS["x86_64"]
SYSCALLS["arm64"] = SYSCALLS["aarch64"]

# What a refusal by the sandbox looks like: the seccomp filter or a missing
# capability (EPERM / EACCES), or a kernel that does not offer the call (ENOSYS).
REFUSED = {errno.EPERM, errno.EACCES, errno.ENOSYS}
# gVisor answers some calls it does not implement at all with these instead.
GVISOR_UNIMPLEMENTED = {errno.EOPNOTSUPP, errno.ENODEV}

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
WALL = 0x40000000
PR_GET_NO_NEW_PRIVS = 39
SYSLOG_ACTION_READ_ALL = 3
MS_BIND = 0x1000
MS_REMOUNT = 0x20
AT_FDCWD = -100

# Environment variables whose names match SECRET_WORDS but are known to be harmless.
HARMLESS_ENV = {
    "GPG_KEY",  # python:3.x images: the fingerprint of CPython's public release key
}
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE")

IPC_DIR = "/run/sandbox"
TOKEN_PATH = f"{IPC_DIR}/token"
BULK_SOCKET_PATH = f"{IPC_DIR}/bulk.sock"
SOCKET_PATH = f"{IPC_DIR}/sandbox.sock"
ENGINE_SOCKET_PATTERNS = ("*docker*.sock", "*containerd*.sock", "*podman*.sock", "*crio*.sock")
ENGINE_MOUNT_RE = re.compile(r"(docker|containerd|podman|crio)[^/]*\.sock")
WALK_LIMIT = 400_000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class Env:
    """What every probe gets: the task context, the caps and the runtime it found."""

    def __init__(self, ctx, params, runtime, evidence):
        self.ctx = ctx
        self.params = params
        self.runtime = runtime
        self.evidence = evidence

    @property
    def gvisor(self):
        return self.runtime == "runsc"

    def cap(self, name):
        value = self.params.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"parameter {name!r} (the policy's cap) is missing")
        return value


# -- helpers -----------------------------------------------------------------


def _ename(code):
    return errno.errorcode.get(code, str(code))


def _arg(value):
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, int):
        return ctypes.c_long(value)
    return value


def _syscall(name, *args):
    """Call syscall ``name`` raw; ``(return value, errno name or "")``."""
    table = SYSCALLS.get(platform.machine())
    if table is None:
        raise RuntimeError(f"no syscall table for machine {platform.machine()!r}")
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(table[name]), *(_arg(a) for a in args))
    code = ctypes.get_errno()
    return ret, (_ename(code) if ret == -1 else "")


def _refused(env, attempts):
    """``(held, detail)`` for ``{label: (ret, errno name)}``: held if every call was refused."""
    refused_names = {_ename(c) for c in REFUSED | (GVISOR_UNIMPLEMENTED if env.gvisor else set())}
    held = all(ret == -1 and err in refused_names for ret, err in attempts.values())
    detail = ", ".join(f"{label}={err or f'ok({ret})'}" for label, (ret, err) in attempts.items())
    return held, detail


def _in_child(fn, timeout=15.0):
    """Run ``fn`` in a forked child; its JSON-able return value, or {"crash": ...}.

    Whatever the child does to itself (namespaces, mounts, ptrace) ends with it.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            try:
                out = json.dumps(fn())
            except BaseException as exc:
                out = json.dumps({"crash": f"{type(exc).__name__}: {exc}"})
            os.write(w, out.encode()[:60_000])
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                data = json.dumps({"crash": f"child timed out after {timeout:g} s"}).encode()
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(data or b'{"crash": "child said nothing"}')


def _status_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None


def _read_kernel_log():
    """``(ret, errno name, text)`` from syslog(SYSLOG_ACTION_READ_ALL)."""
    size = 1 << 16
    buf = ctypes.create_string_buffer(size)
    ret, err = _syscall("syslog", SYSLOG_ACTION_READ_ALL, buf, size)
    text = buf.raw[: max(ret, 0)].decode(errors="replace")
    return ret, err, text


def detect_runtime():
    """``("runsc" | "runc", evidence)``, judged from inside.

    gVisor's kernel log (which it lets anyone read) names it, and its
    ``/proc/version`` is a fixed fake 4.4.0. Under runc reading the host's
    kernel log is refused (a probe checks that).
    """
    ret, err, text = _read_kernel_log()
    with open("/proc/version") as f:
        version = f.read().strip()
    if ret >= 0 and "gVisor" in text:
        first = next((line for line in text.splitlines() if "gVisor" in line), "")
        return "runsc", f"kernel log: {first.strip()!r}; /proc/version: {version!r}"
    if version.startswith("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016"):
        return "runsc", f"/proc/version is gVisor's: {version!r}"
    return "runc", f"kernel log: {err or f'{ret} bytes'}; /proc/version: {version[:80]!r}"


def _write_refused(env, path):
    """Held if creating ``path`` fails because its mount is read-only.

    Linux says EROFS. gVisor checks the directory's permissions before the
    mount's flags and says EACCES (only_expected_mounts checks the flags there).
    """
    expected = {"EROFS", "EACCES"} if env.gvisor else {"EROFS"}
    try:
        with open(path, "x") as f:
            f.write("x")
    except OSError as exc:
        code = _ename(exc.errno)
        return code in expected, f"{path}: {code} (a refusal is one of {sorted(expected)})"
    os.unlink(path)
    return False, f"{path}: written"


# How opening a kernel interface for writing may fail: denied, read-only, or
# not there at all. Anything else (EINVAL, EIO, ...) is not a refusal.
WRITE_OPEN_REFUSED = {"EACCES", "EPERM", "EROFS", "ENOENT"}


def _open_for_write_refused(paths):
    """Try to open each path for writing (never write); held if each is refused."""
    results = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            results[path] = _ename(exc.errno)
        else:
            os.close(fd)
            results[path] = "OPENED"
    held = all(v in WRITE_OPEN_REFUSED for v in results.values())
    return held, ", ".join(f"{p}: {v}" for p, v in results.items())


# -- network -------------------------------------------------------------------


SIOCGIFCONF = 0x8912
IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux
RTF_REJECT = 0x0200
IPV6_LOOPBACK = ipaddress.IPv6Address("::1")
# Socket tables of the container's network namespace. gVisor has no raw ones.
SOCKET_TABLES = ("tcp", "udp", "tcp6", "udp6", "raw", "raw6")


def _proc_net_rows(name):
    with open(f"/proc/net/{name}") as f:
        return [line.split() for line in f.read().splitlines() if line.strip()]


def _ifconf(length, address):
    """A ``struct ifconf`` (int length, then a pointer, 8-aligned) for SIOCGIFCONF."""
    return length.to_bytes(4, sys.byteorder) + bytes(4) + address.to_bytes(8, sys.byteorder)


def _ipv4_addresses():
    """``[(interface, address)]`` of every IPv4 address, as SIOCGIFCONF lists them."""
    buf = array.array("B", bytes(IFREQ_SIZE * 64))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # made, never used to send
        packed = fcntl.ioctl(s.fileno(), SIOCGIFCONF, _ifconf(len(buf), buf.buffer_info()[0]))
    size = int.from_bytes(packed[:4], sys.byteorder, signed=True)
    raw = buf.tobytes()[:size]
    return [
        (raw[i : i + 16].split(b"\0", 1)[0].decode(), socket.inet_ntoa(raw[i + 20 : i + 24]))
        for i in range(0, size, IFREQ_SIZE)
    ]


def _socket_address(text):
    """An address as /proc/net/{tcp,udp,raw}[6] print it: 32-bit words in host order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def _ipv6(text):
    """An address as /proc/net/if_inet6 and ipv6_route print it: 32 hex digits, network order."""
    return ipaddress.IPv6Address(bytes.fromhex(text))


def _local_only(address):
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return address.is_loopback or address.is_unspecified


def probe_only_loopback(env):
    """One interface, lo, in every view; addresses only 127/8 and ::1; no socket off loopback."""
    problems = []
    with open("/proc/net/dev") as f:
        dev = sorted(line.split(":", 1)[0].strip() for line in f.read().splitlines()[2:] if ":" in line)
    views = {
        "/sys/class/net": sorted(os.listdir("/sys/class/net")),
        "/proc/net/dev": dev,
        "if_nameindex": sorted(name for _, name in socket.if_nameindex()),
    }
    problems += [f"{where}: {names}" for where, names in views.items() if names != ["lo"]]
    ipv4 = _ipv4_addresses()
    problems += [f"IPv4 {a} on {i}" for i, a in ipv4 if i != "lo" or not ipaddress.ip_address(a).is_loopback]
    ipv6 = [(row[5], row[0]) for row in _proc_net_rows("if_inet6")]
    problems += [f"IPv6 {_ipv6(a)} on {i}" for i, a in ipv6 if i != "lo" or _ipv6(a) != IPV6_LOOPBACK]
    sockets = 0
    for table in SOCKET_TABLES:
        try:
            rows = _proc_net_rows(table)[1:]
        except FileNotFoundError:
            if env.gvisor and table.startswith("raw"):
                continue
            raise
        sockets += len(rows)
        for row in rows:
            local, remote = (_socket_address(end.split(":")[0]) for end in row[1:3])
            if not (_local_only(local) and _local_only(remote)):
                problems.append(f"{table} socket {local} -> {remote}")
    return not problems, (
        f"problems: {problems}; interfaces: {views['/sys/class/net']}, IPv4: {ipv4}, "
        f"IPv6: {[(i, str(_ipv6(a))) for i, a in ipv6]}, sockets: {sockets}"
    )


def probe_no_routes(env):
    """No IPv4 or IPv6 route leads anywhere but loopback (or nowhere: a reject route)."""
    problems = []
    ipv4 = _proc_net_rows("route")[1:]
    problems += [f"IPv4 {row[1]} via {row[2]} dev {row[0]}" for row in ipv4]
    ipv6 = _proc_net_rows("ipv6_route")
    for dest, plen, _src, _splen, hop, _metric, _ref, _use, flags, dev in (row[:10] for row in ipv6):
        net = f"{_ipv6(dest)}/{int(plen, 16)}"
        reject = int(flags, 16) & RTF_REJECT
        loopback = net in ("::1/128", "ff00::/8")
        if dev != "lo" or int(hop, 16) or not (reject or loopback):
            problems.append(f"IPv6 {net} via {_ipv6(hop)} dev {dev} flags {flags}")
    return not problems, f"problems: {problems}; {len(ipv4)} IPv4 and {len(ipv6)} IPv6 routes"


# -- identity and privileges ---------------------------------------------------


def probe_not_root(env):
    uid, gid = os.getuid(), os.getgid()
    held = 0 not in (uid, os.geteuid(), gid, os.getegid()) and 0 not in os.getgroups()
    return held, f"uid={uid} gid={gid} groups={os.getgroups()}"


def probe_own_uid_shared_group(env):
    """A uid from the task range (each task its own), the policy's group, no other groups."""
    start, count, gid = env.cap("uid_start"), env.cap("uid_count"), env.cap("gid")
    uid, groups = os.getuid(), set(os.getgroups())
    held = start <= uid < start + count and os.getgid() == gid and groups <= {gid}
    return held, f"uid={uid} gid={os.getgid()} groups={sorted(groups)}; range {start}+{count}, group {gid}"


def probe_capabilities_empty(env):
    caps = {k: _status_field(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    # gVisor's /proc/self/status has no CapAmb line; every line that is there must be zero.
    required = ("CapInh", "CapPrm", "CapEff", "CapBnd") if env.gvisor else tuple(caps)
    held = all(caps[k] is not None for k in required) and all(
        int(v, 16) == 0 for v in caps.values() if v is not None
    )
    return held, str(caps)


def probe_no_new_privs(env):
    ctypes.set_errno(0)
    prctl = _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    line = _status_field("NoNewPrivs")
    detail = f"prctl(PR_GET_NO_NEW_PRIVS)={prctl}, status NoNewPrivs={line}"
    if env.gvisor and line is None and prctl != 1:
        return None, f"gVisor's own kernel does not report it: {detail}"
    return prctl == 1 and line in ("1", None), detail


def probe_seccomp_filter(env):
    value = _status_field("Seccomp")
    if env.gvisor:
        return None, f"Seccomp={value} is gVisor's own (guest) view; the host filter is on the Sentry"
    return value == "2", f"Seccomp={value}"


def probe_kernel_log_refused(env):
    ret, err, _text = _read_kernel_log()
    kmsg = os.path.exists("/dev/kmsg")
    if env.gvisor:
        return None, f"gVisor serves its own kernel log ({ret} bytes), not the host's"
    held = ret == -1 and err in ("EPERM", "EACCES") and not kmsg
    return held, f"syslog(READ_ALL): {err or ret}; /dev/kmsg={kmsg}"


def probe_ptrace_pid1_refused(env):
    def attach():
        ret, err = _syscall("ptrace", PTRACE_ATTACH, 1, None, None)
        if ret == -1:
            return {"attach": err}
        stopped = False
        for _ in range(200):
            try:
                pid, _status = os.waitpid(1, os.WNOHANG | WALL)
            except ChildProcessError:
                break
            if pid:
                stopped = True
                break
            time.sleep(0.005)
        detach = _syscall("ptrace", PTRACE_DETACH, 1, None, None)
        return {"attach": f"ATTACHED (stopped={stopped})", "detach": detach[1] or "ok"}

    out = _in_child(attach)
    held = out.get("attach") in ("EPERM", "EACCES", "ENOSYS")
    return held, f"ptrace(PTRACE_ATTACH, 1): {out}"


# -- what the sandbox learns about the host ----------------------------------------

# Addresses Docker writes into /etc/hosts for a network-less container: loopback
# and the fixed IPv6 multicast names. Anything else would name a host network.
HOSTS_ADDRESSES = re.compile(r"^(127\.[0-9.]+|::1|fe00::0|ff00::0|ff02::[12])$")


def _config_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith(("#", ";"))]


def probe_no_host_dns_config(env):
    """No resolver configuration, and nothing of the host's in resolv.conf, hosts or hostname."""
    problems = []
    try:
        resolv = _config_lines("/etc/resolv.conf")
    except FileNotFoundError:
        resolv = []
    if resolv:
        problems.append(f"/etc/resolv.conf: {resolv[:4]}")
    hosts = _config_lines("/etc/hosts")
    odd = [line for line in hosts if not HOSTS_ADDRESSES.match(line.split()[0])]
    if odd:
        problems.append(f"/etc/hosts: {odd[:4]}")
    texts = {}
    for path in ("/etc/resolv.conf", "/etc/hosts", "/etc/hostname"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            texts[path] = f.read()
    for secret in [*env.params.get("host_nameservers", []), env.params.get("host_hostname", "")]:
        for path, text in texts.items():
            if secret and re.search(rf"(^|\s){re.escape(secret)}($|\s)", text):
                problems.append(f"{path} names the host's {secret!r}")
    return not problems, f"problems: {problems}; resolv.conf lines: {len(resolv)}, hosts lines: {len(hosts)}"


# -- namespaces and mounts -----------------------------------------------------


def probe_pid1_memory_not_readable(env):
    """Reading init's memory needs the same ptrace access as attaching to it.

    Held only on an exact refusal: opening /proc/1/mem denied (EACCES/EPERM),
    or, if it opens, reading a page pid 1 has mapped refused (EACCES/EPERM/EIO).
    An open /proc/1/mem with no mapped address to try is not held: nothing was
    shown.
    """
    try:
        fd = os.open("/proc/1/mem", os.O_RDONLY)
    except OSError as exc:
        code = _ename(exc.errno)
        return code in ("EACCES", "EPERM"), f"open /proc/1/mem: {code}"
    try:
        try:
            with open("/proc/1/maps") as f:
                first = f.readline()
            start = int(first.split("-", 1)[0], 16)
        except (OSError, ValueError) as exc:
            return False, f"/proc/1/mem opened, but no address to try: /proc/1/maps: {exc!r}"
        try:
            data = os.pread(fd, 4, start)
        except OSError as exc:
            code = _ename(exc.errno)
            return code in ("EACCES", "EPERM", "EIO"), f"/proc/1/mem opened; read at {start:#x}: {code}"
    finally:
        os.close(fd)
    return False, f"read {data!r} from pid 1's memory at {start:#x} ({first.split()[-1]})"


def probe_unshare_refused(env):
    flags = {
        "NEWUSER|NEWNS": CLONE_NEWUSER | CLONE_NEWNS,
        "NEWUSER": CLONE_NEWUSER,
        "NEWNS": CLONE_NEWNS,
        "NEWNET": CLONE_NEWNET,
        "NEWPID": CLONE_NEWPID,
        "NEWUTS": CLONE_NEWUTS,
        "NEWIPC": CLONE_NEWIPC,
        "NEWCGROUP": CLONE_NEWCGROUP,
    }
    attempts = {}
    for label, value in flags.items():
        out = _in_child(lambda v=value: list(_syscall("unshare", v)))
        attempts[label] = tuple(out) if isinstance(out, list) else (0, str(out))
    held, detail = _refused(env, attempts)
    if env.gvisor:
        return None, f"gVisor makes these namespaces in its own kernel, not the host's: {detail}"
    return held, detail


NAMESPACES = ("mnt", "net", "pid", "user", "uts", "ipc", "cgroup")
# gVisor (2022-12) has only these under /proc/PID/ns, and no setns at all.
GVISOR_NAMESPACES = ("net", "pid", "user")


def probe_setns_refused(env):
    """setns() on a namespace file the sandbox could open is refused, with exactly the right errno.

    Runc: the seccomp filter (and no CAP_SYS_ADMIN) answers EPERM, even for
    the sandbox's own namespaces, which an unfiltered process with the
    capability could join. gVisor does not implement setns: EOPNOTSUPP,
    unless gVisor applies the sandbox's seccomp profile (registered with
    --oci-seccomp; its /proc then shows Seccomp: 2), which refuses it first:
    EPERM. Pid 1's namespace files may instead be closed to us (init is not
    dumpable): EACCES/EPERM on open. A namespace file that will not open for
    another reason proves nothing, and does not count as a refusal.
    """
    want = "EPERM"
    if env.gvisor and _status_field("Seccomp") != "2":
        want = _ename(errno.EOPNOTSUPP)
    present = GVISOR_NAMESPACES if env.gvisor else NAMESPACES

    def join():
        out = {}
        for who in ("self", "1"):
            for ns in NAMESPACES:
                try:
                    fd = os.open(f"/proc/{who}/ns/{ns}", os.O_RDONLY)
                except OSError as exc:
                    out[f"{who}/{ns}"] = f"open {_ename(exc.errno)}"
                    continue
                try:
                    ret, err = _syscall("setns", fd, 0)
                    out[f"{who}/{ns}"] = err or f"JOINED({ret})"
                finally:
                    os.close(fd)
        return out

    out = _in_child(join)
    if "crash" in out:
        return False, f"setns: {out}"
    problems = []
    for key, got in out.items():
        who, ns = key.split("/")
        if ns not in present:
            ok = got == "open ENOENT"  # a namespace this runtime does not have
        elif who == "self":
            ok = got == want  # our own files always open: only setns may refuse
        else:
            ok = got in (want, "open EACCES", "open EPERM")
        if not ok:
            problems.append(f"{key}: {got}")
    refused = sum(1 for got in out.values() if got == want)
    held = not problems and refused >= len(present)
    return held, f"problems: {problems}; want {want}; setns(/proc/{{self,1}}/ns/*): {out}"


def probe_mount_refused(env):
    target = "/tmp/probe-mnt"

    def try_mounts():
        os.makedirs(target, exist_ok=True)
        return {
            "tmpfs": list(_syscall("mount", b"none", target.encode(), b"tmpfs", 0, None)),
            "bind /": list(_syscall("mount", b"/", target.encode(), None, MS_BIND, None)),
            "remount / rw": list(_syscall("mount", None, b"/", None, MS_REMOUNT, None)),
            "proc": list(_syscall("mount", b"proc", target.encode(), b"proc", 0, None)),
        }

    try:
        out = _in_child(try_mounts)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(target)
    if "crash" in out:
        return False, str(out)
    return _refused(env, {k: tuple(v) for k, v in out.items()})


# -- dangerous syscalls ----------------------------------------------------------


def probe_keyctl_refused(env):
    KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, KEY_SPEC_PROCESS_KEYRING = 0, -3, -2
    return _refused(
        env,
        {
            "keyctl": _syscall("keyctl", KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0),
            "add_key": _syscall("add_key", b"user", b"probe", b"x", 1, KEY_SPEC_PROCESS_KEYRING),
            "request_key": _syscall("request_key", b"user", b"probe", None, 0),
        },
    )


def probe_bpf_refused(env):
    BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2
    attr = (ctypes.c_uint32 * 32)(BPF_MAP_TYPE_ARRAY, 4, 4, 1)  # type, key, value size, entries
    ret, err = _syscall("bpf", BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret >= 0:
        os.close(ret)
    return _refused(env, {"bpf(MAP_CREATE)": (ret, err)})


def probe_perf_event_open_refused(env):
    PERF_TYPE_SOFTWARE = 1
    attr = (ctypes.c_uint8 * 128)()
    words = (ctypes.c_uint32 * 2).from_buffer(attr)
    words[0], words[1] = PERF_TYPE_SOFTWARE, 128  # config 0 = PERF_COUNT_SW_CPU_CLOCK
    ctypes.c_uint64.from_buffer(attr, 40).value = 0x61  # disabled, exclude_kernel, exclude_hv
    ret, err = _syscall("perf_event_open", ctypes.byref(attr), 0, -1, -1, 0)
    if ret >= 0:
        os.close(ret)
    return _refused(env, {"perf_event_open(self, sw clock)": (ret, err)})


def probe_module_loading_refused(env):
    image = ctypes.create_string_buffer(64)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        attempts = {
            "init_module": _syscall("init_module", image, 64, b""),
            "finit_module": _syscall("finit_module", fd, b"", 0),
            "delete_module": _syscall("delete_module", b"probe", os.O_NONBLOCK),
        }
    finally:
        os.close(fd)
    return _refused(env, attempts)


def probe_kexec_refused(env):
    return _refused(
        env,
        {
            "kexec_load": _syscall("kexec_load", 0, 0, None, 0),
            "kexec_file_load": _syscall("kexec_file_load", -1, -1, 0, None, 0),
        },
    )


def probe_open_by_handle_at_refused(env):
    handle = (ctypes.c_uint32 * 8)(16, 1)  # handle_bytes, handle_type, then the handle
    return _refused(env, {"open_by_handle_at": _syscall("open_by_handle_at", AT_FDCWD, handle, os.O_RDONLY)})


def probe_userfaultfd_refused(env):
    ret, err = _syscall("userfaultfd", os.O_CLOEXEC)
    if ret >= 0:
        os.close(ret)
    return _refused(env, {"userfaultfd": (ret, err)})


# -- host interfaces -------------------------------------------------------------


def probe_proc_sys_read_only(env):
    return _open_for_write_refused(
        [
            "/proc/sys/kernel/hostname",
            "/proc/sys/kernel/core_pattern",
            "/proc/sys/kernel/modprobe",
            "/proc/sys/vm/overcommit_memory",
            "/proc/sys/net/ipv4/ip_forward",
        ]
    )


def probe_sysrq_trigger_not_writable(env):
    return _open_for_write_refused(["/proc/sysrq-trigger"])


def probe_kcore_not_readable(env):
    results = {}
    for path in ("/proc/kcore", "/proc/kmsg", "/dev/mem", "/dev/kmem", "/dev/port"):
        try:
            with open(path, "rb") as f:
                data = f.read(4096)
        except OSError as exc:
            results[path] = _ename(exc.errno)
        else:
            results[path] = f"read {len(data)} bytes"
    held = all(v in ("EACCES", "EPERM", "ENOENT", "read 0 bytes") for v in results.values())
    return held, str(results)


def probe_sys_firmware_not_readable(env):
    readable = []
    try:
        for root, _dirs, files in os.walk("/sys/firmware"):
            for name in files:
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        if f.read(1):
                            readable.append(path)
                except OSError:
                    pass
        listing = os.listdir("/sys/firmware")
    except OSError as exc:
        code = _ename(exc.errno)
        return code in ("ENOENT", "EACCES", "EPERM"), f"/sys/firmware: {code}"
    return not readable, f"entries: {listing[:10]}, readable files: {readable[:5]}"


def probe_no_block_devices(env):
    found = []
    for root, _dirs, files in os.walk("/dev"):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if stat.S_ISBLK(os.lstat(path).st_mode):
                    found.append(path)
    present = [p for p in ("/dev/mem", "/dev/kmem", "/dev/port") if os.path.lexists(p)]
    return not found and not present, f"block devices: {found}, memory devices: {present}"


def probe_release_agent_not_writable(env):
    paths = sorted({*glob.glob("/sys/fs/cgroup/release_agent"), *glob.glob("/sys/fs/cgroup/*/release_agent")})
    if not paths:
        with contextlib.suppress(OSError):
            os.listdir("/sys/fs/cgroup")
            return True, "no release_agent visible under /sys/fs/cgroup"
        return True, "/sys/fs/cgroup is not there"
    return _open_for_write_refused(paths)


def _is_socket(entry):
    # Only special files (d_type says which) are worth a stat.
    if entry.is_file(follow_symlinks=False) or entry.is_symlink():
        return False
    return stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)


def probe_no_engine_socket(env):
    """No Docker / containerd socket anywhere, and no Unix socket but the task's own."""
    named, sockets, errors = [], [], 0
    seen = 0
    stack = ["/"]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            errors += 1
            continue
        for entry in entries:
            seen += 1
            if seen > WALK_LIMIT:
                return False, f"walk stopped after {WALK_LIMIT} entries: the check is incomplete"
            if any(fnmatch.fnmatch(entry.name, p) for p in ENGINE_SOCKET_PATTERNS):
                named.append(entry.path)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.path not in ("/proc", "/sys"):
                        stack.append(entry.path)
                elif _is_socket(entry):
                    sockets.append(entry.path)
            except OSError:
                errors += 1
    with open("/proc/self/mountinfo") as f:
        mounts = [line for line in f if ENGINE_MOUNT_RE.search(line.split(" - ")[0].split()[3])]
    # The task's own sockets: its gRPC server and its bulk path (the lifeline
    # and a warm slot's start line are gone once connected).
    others = [s for s in sockets if s not in (SOCKET_PATH, BULK_SOCKET_PATH)]
    held = not named and not others and not mounts
    return held, (
        f"walked {seen} entries ({errors} unreadable dirs); engine-named: {named[:5]}, "
        f"other sockets: {others[:5]}, engine mounts: {[m.split()[4] for m in mounts][:5]}"
    )


# Mounts that may be writable: the scratch tmpfs, the kernel's virtual file
# systems (whose files the sandbox uid cannot write) and /dev.
WRITABLE_MOUNTS = {"/tmp", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/proc", "/sys/fs/cgroup"}
VIRTUAL_FS = {"proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2"}
# The only host paths the container sees besides its root: the task's four
# mounts (the datasource, the bundle, the IPC directory with the task's socket
# and token, and an empty resolv.conf), and the two files the engine adds.
TASK_MOUNTS = ("/data", "/sandbox/protocol", IPC_DIR, "/etc/resolv.conf")
HOST_MOUNTS = {*TASK_MOUNTS, "/etc/hosts", "/etc/hostname"}


def probe_only_expected_mounts(env):
    """The root and every host mount read-only; no host mount beyond the task's own."""
    problems, host, roots = [], [], {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            fields, fstype = before.split(), after.split()[0]
            root, point, options = fields[3], fields[4], fields[5].split(",")
            writable = "rw" in options
            if fstype in VIRTUAL_FS:
                masked = point.startswith("/proc/") and root == "/null"  # runc's masked paths
                if writable and point not in WRITABLE_MOUNTS and not masked:
                    problems.append(f"{point} ({fstype}) writable")
                continue
            if point != "/":
                host.append(point)
                roots[point] = root
                if point not in HOST_MOUNTS:
                    problems.append(f"unexpected host mount {point} ({fstype} {root})")
            if writable:
                problems.append(f"{point} ({fstype}) writable")
    for needed in TASK_MOUNTS:
        if host.count(needed) != 1:
            problems.append(f"{needed} mounted {host.count(needed)} times")
    # Under runc the sources show: the bundle, the IPC directory and resolv.conf
    # all come from the task's own directory (gVisor shows every root as "/").
    if not env.gvisor:
        parents = {
            os.path.dirname(roots.get(p, "")) for p in ("/sandbox/protocol", IPC_DIR, "/etc/resolv.conf")
        }
        if len(parents) != 1:
            problems.append(f"task mounts from different directories: {sorted(parents)}")
    return not problems, f"problems: {problems}; host mounts: {sorted(host)}"


# pid 1 is the runtime's own init, which runs the runtime (this process).
INIT_ARGV = [
    *("python3", "-P", "-S", "-m", "executor.sandbox.init"),
    *("--lifeline", f"{IPC_DIR}/lifeline.sock", "--"),
]
RUNTIME_ARGV = [
    *("python3", "-P", "-m", "executor.sandbox"),
    *("--socket", SOCKET_PATH, "--token-file", TOKEN_PATH),
]
# A warm pool's sandbox waits for its task; nothing else may differ.
WARM_RUNTIME_ARGV = [*RUNTIME_ARGV, "--wait-for-task"]


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [arg.decode(errors="replace") for arg in f.read().split(b"\0")[:-1]]


def probe_own_pid_namespace(env):
    """A pid namespace of our own: pid 1 is exactly our init running exactly this runtime."""
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    init, me = _cmdline(1), _cmdline("self")
    runtime = me if me in (RUNTIME_ARGV, WARM_RUNTIME_ARGV) else RUNTIME_ARGV
    held = init == INIT_ARGV + runtime and me == runtime and os.getppid() == 1 and len(pids) < 10
    return held, f"pid 1: {init}; this process: {me} (parent {os.getppid()}); pids: {pids}"


# -- filesystem ----------------------------------------------------------------


def probe_root_read_only(env):
    return _write_refused(env, "/probe-root")


def probe_etc_read_only(env):
    return _write_refused(env, "/etc/probe")


def probe_usr_read_only(env):
    return _write_refused(env, "/usr/probe")


def probe_data_read_only(env):
    return _write_refused(env, str(env.ctx.data_dir / "probe"))


def probe_data_readable(env):
    names = sorted(p.name for p in env.ctx.data_dir.iterdir())
    return bool(names), f"data: {names}"


def probe_protocol_read_only(env):
    return _write_refused(env, os.path.join(os.path.dirname(__file__), "probe"))


def probe_ipc_dir_read_only(env):
    return _write_refused(env, f"{IPC_DIR}/probe")


def probe_token_private(env):
    token, sock = os.stat(TOKEN_PATH), os.stat(SOCKET_PATH)
    detail = (
        f"token uid={token.st_uid} mode={stat.S_IMODE(token.st_mode):o}; "
        f"socket uid={sock.st_uid} mode={stat.S_IMODE(sock.st_mode):o}; sandbox uid={os.getuid()}"
    )
    if not env.params.get("parent_is_root", False):
        return None, f"the parent is not root, so the token is open behind a random directory: {detail}"
    uid = os.getuid()
    held = (
        token.st_uid == uid
        and stat.S_IMODE(token.st_mode) & 0o077 == 0
        and sock.st_uid == uid
        and stat.S_IMODE(sock.st_mode) & 0o077 == 0
    )
    return held, detail


def probe_tmp_not_executable(env):
    path = "/tmp/probe.sh"
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho ran\n")
    os.chmod(path, 0o755)
    try:
        out = subprocess.run([path], capture_output=True, timeout=10)
    except PermissionError as exc:
        return True, f"exec refused: {exc.strerror}"
    finally:
        os.unlink(path)
    return False, f"executed: {out.stdout!r}"


def probe_tmp_writable(env):
    path = "/tmp/probe.txt"
    with open(path, "w") as f:
        f.write("ok")
    os.unlink(path)
    return True, "scratch space writable"


# -- resource caps ---------------------------------------------------------------


def probe_core_dumps_off(env):
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    return hard == 0, f"core soft={soft} hard={hard}"


def probe_nofile_capped(env):
    cap = env.cap("nofile")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fds, refused = [], ""
    try:
        while len(fds) < cap + 16:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        refused = _ename(exc.errno)
    finally:
        highest = max(fds, default=-1)
        for fd in fds:
            os.close(fd)
    held = refused == "EMFILE" and highest < cap and hard <= cap
    return held, f"opened {len(fds)} more (highest fd {highest}) then {refused or 'no refusal'}; " + (
        f"rlimit soft={soft} hard={hard}, cap {cap}"
    )


def probe_tmpfs_capped(env):
    cap = env.cap("tmpfs_mb")
    path = "/tmp/probe-fill"
    chunk = b"\xa5" * MIB
    written, refused = 0, ""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while written < (2 * cap + 8) * MIB:
            written += os.write(fd, chunk)
    except OSError as exc:
        refused = _ename(exc.errno)
    finally:
        os.close(fd)
        os.unlink(path)
    held = refused == "ENOSPC" and written <= (cap + 1) * MIB
    return held, f"wrote {written / MIB:.1f} MiB to /tmp then {refused or 'no refusal'}; cap {cap} MiB"


def _cgroup_memory_limit():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError):
            with open(path) as f:
                raw = f.read().strip()
            return path, (int(raw) if raw.isdigit() else None)
    return None, None


def _meminfo_total():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def probe_memory_capped(env):
    cap = env.cap("memory_mb")
    if env.gvisor:
        # Going past the limit under gVisor ends the whole sandbox (the host's
        # OOM killer takes the Sentry): check what gVisor shows instead, which
        # it takes from the container's limit. The test checks the kill from outside.
        total = _meminfo_total()
        held = total is not None and total <= cap * MIB
        return held, f"gVisor MemTotal={total} bytes, cap {cap} MiB"
    path, limit = _cgroup_memory_limit()
    step = 8 * MIB

    def hog():
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")  # be the one the OOM killer picks
        hoard = []
        for _ in range(2 * cap * MIB // step):
            block = bytearray(step)
            block[::4096] = b"\x01" * len(range(0, step, 4096))
            hoard.append(block)
        return {"allocated_mb": len(hoard) * step // MIB}

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            hog()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    held = killed and limit is not None and limit <= cap * MIB
    how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {status}"
    return held, f"child allocating {2 * cap} MiB: {how}; {path}={limit}, cap {cap} MiB"


def probe_pids_capped(env):
    # Under runc the container's pids cgroup refuses the fork; under gVisor its
    # own kernel does (RLIMIT_NPROC, counted per sandbox), and the sandbox lives on.
    return _fork_until_refused(env.cap("pids"))


# Run in a fresh interpreter, not forked from the sandbox runtime: grpc's fork
# handlers in the runtime retry thread creation after every fork, and at the
# pids cap they retry until they abort the whole process.
FORK_UNTIL_REFUSED = """
import errno, json, os, signal, sys, time
cap, children, refused = int(sys.argv[1]), [], ""
try:
    while len(children) < cap:
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(120)
            finally:
                os._exit(0)
        children.append(pid)
except OSError as exc:
    refused = errno.errorcode.get(exc.errno, str(exc.errno))
finally:
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
print(json.dumps({"children": len(children), "refused": refused}))
"""


def _fork_until_refused(cap):
    """Fork sleeping children until fork() fails (at most ``cap``), then kill and reap them."""
    proc = subprocess.run(
        [sys.executable, "-c", FORK_UNTIL_REFUSED, str(cap)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        return False, f"fork helper exited {proc.returncode}: {proc.stderr[-300:]}"
    out = json.loads(proc.stdout)
    held = out["refused"] == "EAGAIN" and out["children"] < cap
    return held, f"forked {out['children']} children then {out['refused'] or 'no refusal'}; cap {cap}"


def probe_environment_has_no_secrets(env):
    with open(TOKEN_PATH) as f:
        token = f.read().strip()
    suspicious, holds_token = [], []
    sources = {"self": dict(os.environ)}
    with contextlib.suppress(OSError), open("/proc/1/environ", "rb") as f:
        pairs = (item.partition(b"=") for item in f.read().split(b"\0") if item)
        sources["pid 1"] = {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}
    for where, environ in sources.items():
        for name, value in environ.items():
            if token and token in value:
                holds_token.append(f"{where}:{name}")
            if name in HARMLESS_ENV:
                continue
            if any(w in name.upper() or w in value.upper() for w in SECRET_WORDS):
                suspicious.append(f"{where}:{name}")
    held = not suspicious and not holds_token
    names = sorted(sources["self"])
    return held, f"suspicious: {suspicious}, holding the token: {holds_token}; names: {names}"


PROBES = [
    probe_only_loopback,
    probe_no_routes,
    probe_not_root,
    probe_own_uid_shared_group,
    probe_capabilities_empty,
    probe_no_new_privs,
    probe_seccomp_filter,
    probe_kernel_log_refused,
    probe_ptrace_pid1_refused,
    probe_pid1_memory_not_readable,
    probe_unshare_refused,
    probe_setns_refused,
    probe_mount_refused,
    probe_keyctl_refused,
    probe_bpf_refused,
    probe_perf_event_open_refused,
    probe_module_loading_refused,
    probe_kexec_refused,
    probe_open_by_handle_at_refused,
    probe_userfaultfd_refused,
    probe_proc_sys_read_only,
    probe_sysrq_trigger_not_writable,
    probe_kcore_not_readable,
    probe_sys_firmware_not_readable,
    probe_no_block_devices,
    probe_release_agent_not_writable,
    probe_no_engine_socket,
    probe_no_host_dns_config,
    probe_only_expected_mounts,
    probe_own_pid_namespace,
    probe_root_read_only,
    probe_etc_read_only,
    probe_usr_read_only,
    probe_data_read_only,
    probe_data_readable,
    probe_protocol_read_only,
    probe_ipc_dir_read_only,
    probe_token_private,
    probe_tmp_not_executable,
    probe_tmp_writable,
    probe_core_dumps_off,
    probe_nofile_capped,
    probe_tmpfs_capped,
    probe_memory_capped,
    probe_pids_capped,
    probe_environment_has_no_secrets,
]


def _push_cap(mode, params):
    """Go past one cap on purpose; the test judges the outcome from outside."""
    if mode == "memory_hog":
        hoard = []
        for _ in range(4 * int(params["memory_mb"])):
            hoard.append(bytearray(b"\x01") * MIB)
        return {"held": False, "detail": f"allocated {len(hoard)} MiB"}
    raise ValueError(f"unknown mode {mode!r}")


def run(ctx):
    params = dict(ctx.parameters)
    if params.get("mode"):
        return _push_cap(params["mode"], params)
    runtime, evidence = detect_runtime()
    env = Env(ctx, params, runtime, evidence)
    only = params.get("only")
    results = {}
    for probe in PROBES:
        name = probe.__name__.removeprefix("probe_")
        if only and name not in only:
            continue
        try:
            held, detail = probe(env)
        except Exception as exc:
            held, detail = False, f"probe crashed: {type(exc).__name__}: {exc}"
        results[name] = {
            "held": None if held is None else bool(held),
            "detail": str(detail)[:600],
            "applies": held is not None,
        }
    with open("/proc/version") as f:
        kernel = f.read().strip()
    return {
        "runtime": runtime,
        "evidence": evidence,
        "kernel": kernel,
        "machine": platform.machine(),
        "probes": results,
    }
