"""Security probes, run as protocol code inside the sandbox.

Each probe tries something a hostile protocol would try and reports whether
the sandbox held. The result maps a probe name to {"held": bool, "detail": str}.
Probes read local state or act on the container's own namespace only; none
sends traffic anywhere.
"""

import errno
import os
import resource
import stat
import subprocess


def _status_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None


def probe_only_loopback():
    names = sorted(os.listdir("/sys/class/net"))
    return names == ["lo"], f"interfaces: {names}"


def probe_no_routes():
    with open("/proc/net/route") as f:
        routes = f.read().splitlines()[1:]
    return not routes, f"{len(routes)} IPv4 routes"


def probe_capabilities_empty():
    caps = {k: _status_field(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    held = all(v is not None and int(v, 16) == 0 for v in caps.values())
    return held, str(caps)


def probe_no_new_privs():
    value = _status_field("NoNewPrivs")
    return value == "1", f"NoNewPrivs={value}"


def probe_seccomp_filter():
    value = _status_field("Seccomp")
    return value == "2", f"Seccomp={value}"


def probe_not_root():
    uid, gid = os.getuid(), os.getgid()
    return uid != 0 and os.geteuid() != 0 and gid != 0, f"uid={uid} gid={gid}"


def _write_refused(path):
    try:
        with open(path, "w") as f:
            f.write("x")
    except OSError as exc:
        return True, f"{path}: {errno.errorcode.get(exc.errno, exc.errno)}"
    os.unlink(path)
    return False, f"{path}: written"


def probe_root_read_only():
    return _write_refused("/probe-root")


def probe_etc_read_only():
    return _write_refused("/etc/probe")


def probe_usr_read_only():
    return _write_refused("/usr/probe")


def probe_data_read_only(ctx):
    return _write_refused(str(ctx.data_dir / "probe"))


def probe_data_readable(ctx):
    names = sorted(p.name for p in ctx.data_dir.iterdir())
    return bool(names), f"data: {names}"


def probe_protocol_read_only():
    return _write_refused(os.path.join(os.path.dirname(__file__), "probe"))


def probe_tmp_not_executable():
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


def probe_tmp_writable():
    path = "/tmp/probe.txt"
    with open(path, "w") as f:
        f.write("ok")
    os.unlink(path)
    return True, "scratch space writable"


def probe_no_docker_socket():
    found = [
        p
        for p in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock")
        if os.path.exists(p)
    ]
    return not found, f"found: {found}"


def probe_ipc_dir_read_only():
    return _write_refused("/run/sandbox/probe")


def probe_nofile_capped():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 0 < hard <= 1024 and soft <= hard, f"nofile soft={soft} hard={hard}"


def probe_core_dumps_off():
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    return hard == 0, f"core soft={soft} hard={hard}"


def probe_memory_capped():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        if os.path.exists(path):
            with open(path) as f:
                raw = f.read().strip()
            limit = int(raw) if raw.isdigit() else None
            return limit is not None and limit <= 1024 * 1024 * 1024, f"{path}={raw}"
    return False, "no memory cgroup visible"


def probe_own_pid_namespace():
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    with open("/proc/1/cmdline", "rb") as f:
        init = f.read().split(b"\0")[0].decode(errors="replace")
    return len(pids) < 10 and ("init" in init or "python" in init), f"pid 1={init}, {len(pids)} pids"


def probe_no_block_devices():
    found = [n for n in os.listdir("/dev") if stat.S_ISBLK(os.lstat(f"/dev/{n}").st_mode)]
    return not found and not os.path.exists("/dev/mem"), f"block devices: {found}"


PROBES = [
    probe_only_loopback,
    probe_no_routes,
    probe_capabilities_empty,
    probe_no_new_privs,
    probe_seccomp_filter,
    probe_not_root,
    probe_root_read_only,
    probe_etc_read_only,
    probe_usr_read_only,
    probe_data_read_only,
    probe_data_readable,
    probe_protocol_read_only,
    probe_tmp_not_executable,
    probe_tmp_writable,
    probe_no_docker_socket,
    probe_ipc_dir_read_only,
    probe_nofile_capped,
    probe_core_dumps_off,
    probe_memory_capped,
    probe_own_pid_namespace,
    probe_no_block_devices,
]


def run(ctx):
    results = {}
    for probe in PROBES:
        name = probe.__name__.removeprefix("probe_")
        try:
            held, detail = probe(ctx) if probe.__code__.co_argcount else probe()
        except Exception as exc:
            held, detail = False, f"probe crashed: {type(exc).__name__}: {exc}"
        results[name] = {"held": bool(held), "detail": str(detail)[:300]}
    return results
