"""Probes run as protocol code inside a real sandbox, under runc and under gVisor.

The probe protocol (``tests/protocols/probe``) runs once per runtime under a
hardened policy with small caps, and reports for each probe whether the
sandbox held. Every probe must hold under every runtime; a probe may say it
does not apply only where :data:`MAY_NOT_APPLY` allows it, and every allowed
exception must actually be one, so that nothing silently stops being checked.

Which runtime ran is never taken from the outcome (that echoes the policy):
the engine's record of the container (``HostConfig.Runtime``, read while it
exists) and the kernel the sandbox sees must both say so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from executor.backends import LABEL_PARENT
from executor.backends.docker import host_pids_cap
from executor.mailbox.crypto import TaskKeys
from executor.outcome import Outcome, Status
from executor.policy import IsolationPolicy
from executor.policy.seccomp import runsc_applies_profiles
from executor.runner import Executor
from executor.spec import TaskSpec

from ..conftest import PROTOCOLS
from ..engine import RecordingBackend

if TYPE_CHECKING:
    from executor.events import ProgressUpdate

pytestmark = pytest.mark.security

RUNTIMES = ["runc", "runsc"]

# The caps the probe run gets, as policy and as parameters. gVisor's Sentry and
# gofer use about 75 host tasks of the pids cap by themselves (each guest
# process costs several more), so runsc needs a larger one to run at all.
CAPS: dict[str, dict[str, int]] = {
    "runc": {"pids": 64, "memory_mb": 256, "nofile": 256, "tmpfs_mb": 16},
    # Under gVisor every process costs the sandbox about 3 MiB of host memory (its
    # ptrace stubs): 32 stays well inside 256 MiB while the probes fork to the cap.
    "runsc": {"pids": 32, "memory_mb": 256, "nofile": 256, "tmpfs_mb": 16},
}

PARENT_IS_ROOT = os.geteuid() == 0

# Probes that may not apply, per runtime; DESIGN.md's runsc facts say why.
MAY_NOT_APPLY: dict[str, set[str]] = {
    "runc": set(),
    "runsc": {
        "seccomp_filter",  # /proc/self/status shows gVisor's guest seccomp mode; the filter is on the Sentry
        "kernel_log_refused",  # gVisor serves its own (fake) kernel log; that is how the probe detects it
        "unshare_refused",  # new namespaces (here NEWNS, NEWCGROUP) are made inside gVisor's own kernel
    },
}
if not PARENT_IS_ROOT:
    # Only a root parent can hand the token to the sandbox uid alone.
    for _allowed in MAY_NOT_APPLY.values():
        _allowed.add("token_private")

PROBES = [
    "only_loopback",
    "no_routes",
    "not_root",
    "own_uid_shared_group",
    "capabilities_empty",
    "no_new_privs",
    "seccomp_filter",
    "kernel_log_refused",
    "ptrace_pid1_refused",
    "pid1_memory_not_readable",
    "unshare_refused",
    "setns_refused",
    "mount_refused",
    "keyctl_refused",
    "bpf_refused",
    "perf_event_open_refused",
    "module_loading_refused",
    "kexec_refused",
    "open_by_handle_at_refused",
    "userfaultfd_refused",
    "proc_sys_read_only",
    "sysrq_trigger_not_writable",
    "kcore_not_readable",
    "sys_firmware_not_readable",
    "no_block_devices",
    "release_agent_not_writable",
    "no_engine_socket",
    "no_host_dns_config",
    "only_expected_mounts",
    "own_pid_namespace",
    "root_read_only",
    "etc_read_only",
    "usr_read_only",
    "data_read_only",
    "data_readable",
    "protocol_read_only",
    "ipc_dir_read_only",
    "token_private",
    "tmp_not_executable",
    "tmp_writable",
    "core_dumps_off",
    "nofile_capped",
    "tmpfs_capped",
    "memory_capped",
    "pids_capped",
    "environment_has_no_secrets",
]

# Known holes: probe -> {runtime: reason}. Each is an xfail(strict=True), so
# closing the hole turns the test red until the entry goes.
KNOWN_HOLES: dict[str, dict[str, str]] = {}


# /proc/version here: a runc sandbox shares this kernel, a gVisor one has its own.
HOST_KERNEL = Path("/proc/version").read_text().strip()


@dataclass
class ProbeRun:
    """One runtime's probe run, or why there is none."""

    runtime: str
    result: dict[str, Any] | None = None
    missing: str = ""
    engine_runtime: str = ""  # what the engine recorded for the container

    def probes(self) -> dict[str, dict[str, Any]]:
        if self.result is None:
            pytest.fail(self.missing)
        return self.result["probes"]


def _check_runtime(docker_client: Any, runtime: str) -> str:
    """Why ``runtime`` cannot run here, or ""."""
    known = docker_client.info().get("Runtimes", {})
    if runtime not in known:
        return (
            f"the Docker engine has no {runtime!r} runtime (it knows {sorted(known)}): "
            "run `make runsc` (as root) to install gVisor and register it"
        )
    return ""


def _seccomp_applies(docker_client: Any, runtime: str) -> bool:
    """Whether the engine's ``runtime`` applies the sandbox's seccomp profile (runsc: with --oci-seccomp)."""
    if runtime == "runc":
        return True
    args = docker_client.info().get("Runtimes", {}).get(runtime, {}).get("runtimeArgs") or []
    return runsc_applies_profiles(args)


def _run_probe(
    docker_client: Any,
    data: Path,
    runtime: str,
    caps: dict[str, int],
    parameters: dict[str, Any],
    *,
    warm: bool = False,
) -> tuple[Outcome, str]:
    """Run the probe protocol once; the outcome and the runtime the engine recorded.

    ``warm`` runs it in a warm pool's slot (booted before the task existed)
    instead of a cold container. Nothing may remain afterwards: no container,
    task directory or spool.
    """
    policy = IsolationPolicy.hardened().replace(runtime=runtime, timeout_s=120, warm_pool=int(warm), **caps)
    run_dir = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    spool_dir = Path(tempfile.mkdtemp(prefix="se-spool-", dir="/tmp"))
    backend = RecordingBackend()
    try:
        executor = Executor(backend, run_dir=run_dir, spool_dir=spool_dir, policy=policy)
        try:
            if warm:
                assert executor.warm_up(wait=60), executor.pool_stats()
            outcome = executor.run(
                TaskSpec(protocol_dir=PROTOCOLS / "probe", data_dir=data, parameters=parameters)
            )
            assert outcome.warm_starts == int(warm), "the probe ran cold, not in a warm slot"
        finally:
            executor.close()
            leaked = []
            for c in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_PARENT}={executor.instance_id}"}
            ):
                leaked.append(c.name)
                c.remove(force=True)
            left = sorted(str(p) for p in [*run_dir.iterdir(), *spool_dir.iterdir()])
        assert not leaked, f"containers left behind: {leaked}"
        assert not left, f"task directories or spools left behind: {left}"
        # The first container made is the one that ran the task (a warm pool
        # makes its refill after).
        return outcome, backend.containers[0].runtime
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(spool_dir, ignore_errors=True)


def _host_facts() -> dict[str, Any]:
    """What the sandbox must not learn about the host, and the uids it should run as."""
    policy = IsolationPolicy.hardened()
    nameservers = []
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as f:
        for line in f:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                nameservers.append(words[1])
    return {
        "host_nameservers": nameservers,
        # A hostname the sandbox has anyway is no secret.
        "host_hostname": "" if socket.gethostname() in ("localhost", "sandbox") else socket.gethostname(),
        "uid_start": policy.uid_start,
        "uid_count": policy.uid_count,
        "gid": policy.gid,
    }


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("probe-data")
    (data / "records.csv").write_text("id\n1\n")
    data.chmod(0o755)
    (data / "records.csv").chmod(0o644)
    return data


@pytest.fixture(
    scope="module",
    params=[(rt, start) for rt in RUNTIMES for start in ("cold", "warm")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def probe_run(request: pytest.FixtureRequest, docker_client: Any, probe_data: Path) -> ProbeRun:
    """Run the probe protocol once under ``runtime`` with the hardened policy and small caps.

    Once in a cold container and once in a warm pool's slot: a sandbox booted
    before its task existed must hold exactly as a fresh one does.
    """
    runtime, start = request.param
    missing = _check_runtime(docker_client, runtime)
    if missing:
        return ProbeRun(runtime, missing=missing)
    caps = CAPS[runtime]
    outcome, engine_runtime = _run_probe(
        docker_client,
        probe_data,
        runtime,
        caps,
        {**caps, **_host_facts(), "parent_is_root": PARENT_IS_ROOT},
        warm=start == "warm",
    )
    assert outcome.status is Status.OK, outcome.error
    return ProbeRun(runtime, result=outcome.result, engine_runtime=engine_runtime)


def test_probe_ran_in_the_runtime_asked_for(probe_run: ProbeRun) -> None:
    """The engine ran the container with the runtime asked for, and the kernel inside agrees."""
    probe_run.probes()
    assert probe_run.result is not None
    assert probe_run.engine_runtime == probe_run.runtime, "the engine's HostConfig.Runtime"
    assert probe_run.result["runtime"] == probe_run.runtime, probe_run.result["evidence"]
    if probe_run.runtime == "runc":
        assert probe_run.result["kernel"] == HOST_KERNEL, "a runc sandbox runs on the host's kernel"
    else:
        assert probe_run.result["kernel"] != HOST_KERNEL, "a gVisor sandbox has a kernel of its own"


def test_every_probe_ran(probe_run: ProbeRun) -> None:
    assert sorted(probe_run.probes()) == sorted(PROBES)


def test_probes_skipped_only_where_allowed(probe_run: ProbeRun) -> None:
    probes = probe_run.probes()
    not_applied = {name for name, r in probes.items() if not r["applies"]}
    allowed = MAY_NOT_APPLY[probe_run.runtime]
    assert not_applied <= allowed, {n: probes[n]["detail"] for n in sorted(not_applied - allowed)}
    # An allowance nobody needs any more must go, or it could hide a regression later.
    newly = allowed - not_applied
    assert not newly, f"these now apply under {probe_run.runtime}: drop them from MAY_NOT_APPLY: {newly}"


@pytest.mark.parametrize("probe", PROBES)
def test_probe_held(probe_run: ProbeRun, probe: str, request: pytest.FixtureRequest) -> None:
    result = probe_run.probes()[probe]
    if not result["applies"]:
        assert probe in MAY_NOT_APPLY[probe_run.runtime], f"{probe} did not apply: {result['detail']}"
        pytest.skip(f"does not apply under {probe_run.runtime}: {result['detail']}")
    hole = KNOWN_HOLES.get(probe, {}).get(probe_run.runtime)
    if hole:
        request.applymarker(pytest.mark.xfail(strict=True, reason=hole))
    assert result["held"], f"{probe} under {probe_run.runtime}: {result['detail']}"


# -- caps pushed past their limit, judged from outside --------------------------------


@dataclass
class BombRun:
    """A fork bomb's outcome, and the container's pids cgroup at each count it reported."""

    outcome: Outcome
    engine_runtime: str
    steps: list[tuple[int, str, dict[str, int]]]  # (children, "forked" | "refused", pids sample)

    @property
    def forked(self) -> int:
        """How many children the bomb had when it last reported."""
        return max((n for n, _, _ in self.steps), default=0)


def _bomb(executor: Executor, backend: RecordingBackend, data: Path, limit: int) -> BombRun:
    """Run the fork bomb up to ``limit`` children; the engine's pids cgroup is read at each child."""
    steps: list[tuple[int, str, dict[str, int]]] = []

    def sample(update: ProgressUpdate) -> None:
        # Runs before the sandbox's progress call returns, so the bomb waits for it.
        what = "refused" if update.kind.value == "EPOCH_END" else "forked"
        steps.append((update.current_epoch or 0, what, backend.sample_pids()))

    outcome = executor.run(
        TaskSpec(
            protocol_dir=PROTOCOLS / "fork_bomb", data_dir=data, parameters={"report": True, "limit": limit}
        ),
        on_progress=sample,
    )
    return BombRun(outcome, backend.last().runtime, steps)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_fork_bomb_is_stopped_by_the_pids_cap_and_the_next_task_runs(
    runtime: str, docker_client: Any, make_executor: Any, data_dir: Path
) -> None:
    """The policy's pids cap refuses the bomb's fork, and the sandbox lives on; the executor carries on.

    Under runc the engine's pids cgroup is the cap, and counts the refusal.
    Under gVisor the host's cgroup counts gVisor's own threads, and reaching
    it would end the whole sandbox: the cap is gVisor's own (RLIMIT_NPROC,
    counted per sandbox), and the host's cgroup a bound above what it allows,
    never reached.
    """
    missing = _check_runtime(docker_client, runtime)
    if missing:
        pytest.fail(missing)
    cap = CAPS[runtime]["pids"]
    policy = IsolationPolicy.hardened().replace(runtime=runtime, timeout_s=120, pids=cap)
    backend = RecordingBackend()
    executor = make_executor(policy=policy, backend=backend)
    bomb = _bomb(executor, backend, data_dir, limit=4 * cap)

    assert bomb.engine_runtime == runtime
    assert bomb.steps, f"the bomb never reported a child: {bomb.outcome.error}"
    assert bomb.outcome.status is Status.OK, bomb.outcome.error
    assert bomb.outcome.result == {"children": bomb.forked, "refused": "BlockingIOError"}
    assert 0 < bomb.forked < cap, bomb.steps[-1]
    _, what, pids = bomb.steps[-1]
    assert what == "refused", bomb.steps[-3:]
    host_cap = {s["max"] for _, _, s in bomb.steps}
    if runtime == "runc":
        assert host_cap == {cap}, "the engine's pids.max is the policy's cap"
        assert pids["refused"] > 0, f"the engine counted no fork refused at its cap: {pids}"
    else:
        assert host_cap == {host_pids_cap(policy)}, "the host's bound, above what gVisor allows"
        assert max(s["current"] for _, _, s in bomb.steps) < host_pids_cap(policy)
        assert pids["refused"] == 0, f"the host's cap was reached, which ends a gVisor sandbox: {pids}"
    # The same executor runs its next task as if nothing had happened.
    after = executor.run(
        TaskSpec(protocol_dir=PROTOCOLS / "async_run", data_dir=data_dir, parameters={"n": 2})
    )
    assert after.status is Status.OK, after.error


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_memory_hog_is_killed_at_the_memory_cap(runtime: str, docker_client: Any, probe_data: Path) -> None:
    missing = _check_runtime(docker_client, runtime)
    if missing:
        pytest.fail(missing)
    caps = {"memory_mb": CAPS[runtime]["memory_mb"], "pids": CAPS[runtime]["pids"]}
    outcome, engine_runtime = _run_probe(
        docker_client, probe_data, runtime, caps, {"mode": "memory_hog", **caps}
    )
    assert engine_runtime == runtime
    assert outcome.status is Status.KILLED, outcome.result or outcome.error
    assert outcome.error is not None, outcome
    assert outcome.error.type == "OutOfMemory", outcome.error


# -- one task against another: the kernel's per-user pools ----------------------------------


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_task_cannot_drain_the_per_user_kernel_pools_of_another(
    runtime: str, docker_client: Any, make_executor: Any, modeller: Any, data_dir: Path
) -> None:
    """A hog holds all one user may have of mqueue bytes and pipe pages (and inotify
    instances, where the seccomp profile does not refuse inotify); a task running
    beside it still gets its own (each task has a uid of its own)."""
    missing = _check_runtime(docker_client, runtime)
    if missing:
        pytest.fail(missing)
    policy = IsolationPolicy.hardened().replace(
        runtime=runtime, timeout_s=120, nofile=1024, pids=CAPS[runtime]["pids"]
    )
    keys = TaskKeys.generate()
    modeller.add_task("pools-hog", keys)
    hog = make_executor(policy=policy, transport=modeller.transport)
    hog_spec = TaskSpec(
        protocol_dir=PROTOCOLS / "kernel_pools",
        data_dir=data_dir,
        task_id="pools-hog",
        keys=keys,
        parameters={"role": "hog", "hold_s": 90},
    )
    box: list[Outcome] = []
    thread = threading.Thread(target=lambda: box.append(hog.run(hog_spec)), daemon=True)
    thread.start()
    try:
        holding = None
        for _ in range(90):  # until the hog holds everything, or ends without
            holding = modeller.receive("pools-hog", timeout=1)
            if holding is not None or not thread.is_alive():
                break
        assert holding is not None, "the hog never said it held the pools"
        assert holding.type == "TASK_START", f"the hog sent {holding.type} before it said it held the pools"
        victim_spec = TaskSpec(
            protocol_dir=PROTOCOLS / "kernel_pools", data_dir=data_dir, parameters={"role": "victim"}
        )
        victim = make_executor(policy=policy).run(victim_spec)
    finally:
        modeller.send("pools-hog", "MODELLER_RESPONSE", b"release")
        thread.join(120)
        assert not thread.is_alive(), "the task did not end within 120 s of its test's wait"
    assert box, "the hog did not end"
    assert box[0].status is Status.OK, box[0].error
    assert victim.status is Status.OK, victim.error
    held, got = box[0].result, victim.result
    # inotify is no pool to drain where the sandbox's seccomp profile applies
    # (runc, and gVisor registered with --oci-seccomp): it refuses inotify.
    inotify = "EPERM" if _seccomp_applies(docker_client, runtime) else "ok"
    if runtime == "runc":
        # The attack must have worked on its own uid, or this test proves nothing.
        assert (held["inotify"], held["mqueue"], held["pipe"]) == ("EPERM", "EMFILE", "EPERM+small"), held
    assert got["inotify"] == inotify, (held, got)
    assert got["pipe_bytes"] == 65536, (held, got)
    assert got["mqueue"] == "ok", (held, got)
    assert got["uid"] != held["uid"], (held, got)
