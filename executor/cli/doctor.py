"""``sandbox-executor doctor``: what this machine has, what is missing, and the fix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from executor import paths
from executor.backends import DEFAULT_BACKEND, ContainerBackend, open_backend
from executor.data.view import view_method
from executor.errors import SandboxExecutorError
from executor.policy import DEFAULT_IMAGE, RUNTIME_ISOLATION
from executor.sandbox.contract import WIRE_VERSION
from executor.task.admission import STARTS_DIR_NAME, default_max_starting

if TYPE_CHECKING:
    from pathlib import Path

# The images tasks run in, and whether every machine needs it (the base image
# carries no child runtime: `make images` builds from it, no task runs in it).
IMAGES = {DEFAULT_IMAGE: True, "sandbox-executor/numpy:latest": False}
# Per runtime a policy may name: what it gives, the fix when the engine lacks it, whether it is required.
RUNTIMES = {
    "runc": ("hardened namespaces", "install Docker's runc", True),
    "runsc": (
        'gVisor, for projects with runtime = "runsc"',
        "sudo make runsc (installs Debian's runsc and registers it with dockerd)",
        False,
    ),
}


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def checks(
    data_dir: Path | None = None, *, backend: ContainerBackend | None = None, engine: str = DEFAULT_BACKEND
) -> list[Check]:
    """Look at the engine, its runtimes, the images and the executor's directories.

    Args:
        data_dir: Also say how that datasource's views would be made (hard
            links or bind mounts) from this machine's run directory.
        backend: The engine to look at; by default the one registered as ``engine``.
        engine: The registered backend to open when ``backend`` is not given.
    """
    out: list[Check] = []
    backend = backend if backend is not None else open_backend(engine)
    try:
        info = backend.engine_info()
    except SandboxExecutorError as exc:
        return [Check("engine", False, str(exc), "start dockerd, or point DOCKER_HOST at it")]
    out.append(Check("engine", True, f"{info.name} {info.version}, cgroup v{info.cgroup_version}"))
    for name, (gives, fix, required) in RUNTIMES.items():
        runtime = info.runtime_for(RUNTIME_ISOLATION[name])
        out.append(Check(f"runtime {name}", runtime is not None, gives, fix, required=required))
        if name == "runsc" and runtime is not None:
            out.append(
                Check(
                    "runsc seccomp",
                    runtime.applies_seccomp,
                    "gVisor applies the sandbox's seccomp profile"
                    if runtime.applies_seccomp
                    else "runsc is registered without --oci-seccomp: gVisor ignores seccomp profiles, "
                    "so runsc tasks whose policy has a seccomp_profile are refused",
                    "sudo make runsc (re-registers runsc with --oci-seccomp)",
                    required=False,
                )
            )
    # The backend's own image check, as a task's: present, and built for this wire version.
    for image, required in IMAGES.items():
        try:
            backend.check_image(image)
            ok, detail = True, f"present, wire version {WIRE_VERSION}"
        except SandboxExecutorError as exc:
            ok, detail = False, str(exc)
        out.append(Check(f"image {image}", ok, detail, required=required))
    for name, path in (
        ("task directories", paths.run_dir()),
        ("spool", paths.spool_dir()),
        ("project database", paths.db_path()),
    ):
        out.append(
            Check(name, _writable(path), str(path), f"make {path} writable, or set SANDBOX_EXECUTOR_*_DIR")
        )
    # How a task's data view is made: never a copy of the data.
    out.append(Check("data views", True, view_method(paths.run_dir(), data_dir)))
    # The sandbox's CPU time and OOM kills, read from the host's cgroups, tell
    # a slow sandbox from a frozen one and enforce cpu_time_s.
    measured = backend.usage_supported()
    out.append(
        Check(
            "cgroups",
            measured,
            "readable: a silent sandbox whose CPU time advances is slow, not frozen; cpu_time_s is enforced"
            if measured
            else "not readable from here: a silent sandbox is judged by its heartbeats alone, and a "
            "policy setting cpu_time_s is refused",
            "run the executor on the engine's host, where /sys/fs/cgroup shows the containers' cgroups",
            required=False,
        )
    )
    out.append(
        Check(
            "start permits",
            True,
            f"at most {default_max_starting()} sandboxes starting at once on this host by default "
            f"(permits in {paths.uid_dir() / STARTS_DIR_NAME})",
        )
    )
    return out


def _writable(path: Path) -> bool:
    """Whether this process can write ``path``, or make it in its nearest existing directory."""
    if path.is_file():
        return os.access(path, os.W_OK)
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return os.access(parent, os.W_OK | os.X_OK)


def run_doctor(data_dir: Path | None = None) -> int:
    """Print the report; exit 0 when everything required is there, else 1."""
    results = checks(data_dir)
    for c in results:
        mark = "ok " if c.ok else ("MISSING" if c.required else "missing (optional)")
        line = f"{mark:<7} {c.name}: {c.detail}"
        if not c.ok and c.fix:
            line += f"  -> {c.fix}"
        print(line)
    return 0 if all(c.ok or not c.required for c in results) else 1
