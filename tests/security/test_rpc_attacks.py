"""Attacks on the parent's gRPC surface, run as protocol code inside real sandboxes.

For each runtime (runc, gVisor's runsc) one attacker task runs every attack in
``tests/protocols/rpc_attacks`` once; each attack reports whether the parent
answered with exactly the safe status. Meanwhile innocent tasks of the same
executor keep running and must end OK with the right result, and after the
attacker one more must. The attacker must end OK itself (no attack may kill
the sandbox's own channel), and nothing may be left behind. Host-side evidence
(recorded file outcomes, what reached the modeller, the victim's queued
message, the parent's open files) is folded into the attack it belongs to.
Each (runtime, attack) pair is one test.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from executor.backends import LABEL_PARENT, LABEL_TASK
from executor.errors import DecryptionError
from executor.mailbox.crypto import TaskKeys, associated_data, open_sealed, plaintext_size, seal
from executor.mailbox.transport import Envelope, Route
from executor.outcome import Outcome, Status
from executor.policy import IsolationPolicy
from executor.policy.file import PolicySet
from executor.runner import Executor
from executor.spec import TaskSpec
from executor.task.taskdir import SOCKET_NAME
from executor.testing import InMemoryTransport

from .. import rpc_caps
from ..conftest import PROTOCOLS, bounded
from ..procfs import cgroup_pids, connections_of, open_files

pytestmark = [pytest.mark.security, pytest.mark.timeout(900)]

RUNTIMES = ("runc", "runsc")
# In the order the protocol runs them.
ATTACKS = (
    "no_token",
    "wrong_token_same_length",
    "token_other_lengths",
    "other_task_identity",
    "unknown_method",
    "invalid_enums",
    "file_names",
    "field_limits",
    "forged_body_size",
    "garbage_protobuf",
    "garbage_protobuf_one_connection",
    "oversized_message",
    "huge_metadata",
    "second_heartbeat",
    "half_open_streams",
    "pending_receives",
    "garbage_bytes",
    "flood",
    "rapid_cancel",
    "raw_rapid_reset",
    "empty_chunks",
    "file_flood",
    "stalled_requests",
    "bulk_bad_headers",
    "bulk_ticket_reuse",
    "bulk_open_limits",
    "bulk_connection_flood",
    "bulk_short_body",
    "connection_flood",
    "limiter_slot_leak",
)
# Real holes the attacks found; each case fails until the hole is fixed (strict).
KNOWN_HOLES: dict[str, str] = {}
INNOCENT_RESULT = {"async": True, "n": 2}
VICTIM_BODY = b"for the victim task only"
MARK_START = "rpc-attacks:start"
MARK_BEFORE = "rpc-attacks:connections-before"
MARK_HELD = "rpc-attacks:connections-held"
MARK_RELEASED = "rpc-attacks:connections-released"
MARK_ATTACK = "rpc-attacks:attack "
MARK_STUCK = "rpc-attacks:stuck "
MARK_CPU_START = "rpc-attacks:cpu-start"
MARK_CPU_END = "rpc-attacks:cpu-end"
ATTACKER_PROJECT = "rpc-attacks"
# The bulk socket's caps (executor/rpc/bulk.py) as pinned here, not as the code has them;
# tests/unit/test_bulk.py pins the same numbers against the module.
BULK_LIMITS = {
    "bulk_max_connections": 4,
    "bulk_max_tickets": 4,
    "bulk_header_timeout_s": 5.0,
    "bulk_ticket_bytes": 16,
}
# The one body the attacker sends to the end (bulk_ticket_reuse, before reusing its
# ticket): a size no other message has, so the modeller's side can tell it apart.
BULK_REUSE_SIZE = 65_537
# The attacker runs every attack in about a minute (two under gVisor on a busy
# machine); a hang ends as TIMEOUT well before pytest's limit, and a main
# thread that stops moving (a blocked wait) is a stall after STALL_S.
ATTACKER_TIMEOUT_S = 420.0
ATTACKER_STALL_S = 150.0
ATTACKER_PIDS = 512


def _limits() -> dict[str, Any]:
    """The caps the attacks expect: the pinned table, never the code under test."""
    return {**rpc_caps.attack_limits(), **BULK_LIMITS}


def _make_datasource(base: Path) -> Path:
    """Regular files plus symlinks (to a file, out of the datasource, to a directory)."""
    data = base / "data"
    (data / "sub").mkdir(parents=True)
    (data / "records.csv").write_text("id,value\n1,10\n2,32\n")
    (data / "sub" / "inner.csv").write_text("id\n3\n")
    (data / "link.csv").symlink_to("records.csv")
    (data / "escape.csv").symlink_to("/etc/passwd")
    (data / "linkdir").symlink_to("sub")
    for d in (data, data / "sub"):
        d.chmod(0o755)
    for f in (data / "records.csv", data / "sub" / "inner.csv"):
        f.chmod(0o644)
    return data


@dataclass
class AttackRun:
    """What one runtime's attacker task and the innocent tasks around it produced."""

    runtime: str
    unavailable: str = ""
    outcome: Outcome | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_failures: dict[str, list[str]] = field(default_factory=dict)
    host_notes: dict[str, list[str]] = field(default_factory=dict)
    innocents: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    parent_cpu: dict[str, float] = field(default_factory=dict)


def _host_evidence(
    run: AttackRun,
    transport: InMemoryTransport,
    task_id: str,
    victim: str,
    key: bytes,
    fds: dict[str, tuple[int, int]],
) -> None:
    """Fold what the parent recorded into the attacks it belongs to."""
    assert run.outcome is not None

    def fail(attacks: tuple[str, ...], text: str) -> None:
        for a in attacks:
            run.host_failures.setdefault(a, []).append(text)

    expected_files = {"records.csv": ("FAILED", "bad"), "sub/inner.csv": ("FAILED", "bad")}
    files = dict(run.outcome.files)
    if files != expected_files:
        fail(("file_names", "field_limits", "invalid_enums"), f"recorded file outcomes {files}")
    if any(reason == "forged" for _, reason in files.values()):
        fail(("no_token", "wrong_token_same_length", "token_other_lengths"), f"a forged outcome: {files}")
    # Exactly one message may reach the modeller: bulk_ticket_reuse's one completed send.
    reuse_sends = 0
    while (envelope := transport.from_pod(task_id, timeout=0.5)) is not None:
        body = envelope.body
        sealed_size = len(body) if isinstance(body, bytes) else body.stat().st_size
        if isinstance(body, Path):
            body.unlink(missing_ok=True)
        try:
            size = plaintext_size(sealed_size)
        except DecryptionError:
            size = -1
        if envelope.type == "TRAINING_UPDATE" and size == BULK_REUSE_SIZE:
            reuse_sends += 1
            continue
        fail(
            (
                "forged_body_size",
                "half_open_streams",
                "invalid_enums",
                "oversized_message",
                "no_token",
                "bulk_bad_headers",
                "bulk_open_limits",
                "bulk_connection_flood",
                "bulk_short_body",
            ),
            f"a {envelope.type} message of {sealed_size} sealed bytes reached the modeller",
        )
    if reuse_sends != 1:
        fail(
            ("bulk_ticket_reuse",),
            f"its one completed bulk send reached the modeller {reuse_sends} times, not once",
        )
    channel = transport.open(Route(victim))
    try:
        envelope = channel.receive("MODELLER_RESPONSE", 0.5)
    finally:
        channel.close()
    if envelope is None:
        fail(("other_task_identity",), "the victim task's queued MODELLER_RESPONSE is gone")
    elif open_sealed(key, envelope.body, associated_data(victim, "MODELLER_RESPONSE")) != VICTIM_BODY:
        fail(("other_task_identity",), "the victim task's queued MODELLER_RESPONSE was altered")
    cpu_start, cpu_end = run.parent_cpu.get(MARK_CPU_START), run.parent_cpu.get(MARK_CPU_END)
    sandbox_cpu = run.results.get("raw_rapid_reset", {}).get("cpu")
    if cpu_start is not None and cpu_end is not None and sandbox_cpu is not None:
        # The parent's figure includes the innocent tasks running meanwhile;
        # tests/unit/test_service.py holds the ratio without them.
        run.host_notes.setdefault("raw_rapid_reset", []).append(
            f"parent CPU {cpu_end - cpu_start:.2f} s, sandbox CPU {sandbox_cpu:.2f} s"
        )
    # The parent's own count of the attacker's connections, sampled in this
    # process just before the flood, while it was held, and after release.
    marks = (MARK_BEFORE, MARK_HELD, MARK_RELEASED)
    if not all(m in fds for m in marks):
        missing = [m for m in marks if m not in fds]
        fail(("connection_flood",), f"the parent's connections were not sampled at {missing}")
    else:
        (files_before, before), (files_held, held), (files_after, after) = (fds[m] for m in marks)
        if before < 1 or held <= before:
            # The runtime's own channel is open throughout, and the flood got some served.
            fail(
                ("connection_flood",),
                f"the parent's count saw {before} connections of the attacker before the flood and "
                f"{held} while held: it does not see this task's connections",
            )
        if held > rpc_caps.MAX_CONNECTIONS:
            fail(
                ("connection_flood",),
                f"the parent held {held} connections of the attacker's socket, "
                f"more than the cap of {rpc_caps.MAX_CONNECTIONS}",
            )
        if after != before:
            fail(
                ("connection_flood",),
                f"the parent held {after} connections of the attacker's socket after release, "
                f"{before} before the flood",
            )
        # Other tasks run meanwhile, so the process's total is context only.
        run.host_notes.setdefault("connection_flood", []).append(
            f"parent: {before}/{held}/{after} connections of this task and {files_before}/{files_held}/"
            f"{files_after} open files before/while held/after release"
        )


@pytest.fixture(scope="module")
def attack_run(request: pytest.FixtureRequest, docker_client: Any, tmp_path_factory: Any) -> Any:
    """Run the attacker once under ``request.param``, innocent tasks beside it; check no leaks."""
    runtime = request.param
    registered = docker_client.info().get("Runtimes", {})
    if runtime not in registered:
        yield AttackRun(
            runtime,
            unavailable=f"the {runtime} runtime is not registered with the Docker engine "
            f"(it has {sorted(registered)}): run `make runsc`",
        )
        return
    data = _make_datasource(tmp_path_factory.mktemp(f"rpc-attacks-{runtime}"))
    run_dir = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    # A private spool too: another executor's reaper removes spools of task
    # directories it does not know, and the shared default would mix runs.
    spool_dir = Path(tempfile.mkdtemp(prefix="se-spool-", dir="/tmp"))
    transport = InMemoryTransport()
    innocent_policy = bounded(IsolationPolicy.hardened().replace(runtime=runtime))
    # Under gVisor its own threads count against the pids cap (about 75 of the
    # default 128), and a fork past the cap ends the whole sandbox (exit 2, no
    # output; DESIGN's runsc facts). The attacker holds holder processes and
    # bulk transfers open beside the runtime's threads, so it gets the room
    # that is not what these attacks test.
    attacker_policy = innocent_policy.replace(
        timeout_s=ATTACKER_TIMEOUT_S,
        stall_timeout_s=ATTACKER_STALL_S,
        pids=max(innocent_policy.pids, ATTACKER_PIDS),
    )
    executor = Executor(
        run_dir=run_dir,
        spool_dir=spool_dir,
        transport=transport,
        policies=PolicySet(default=innocent_policy, projects={ATTACKER_PROJECT: attacker_policy}),
    )
    task_id = f"rpc-attacker-{runtime}"
    victim = f"rpc-victim-{runtime}"
    victim_keys = TaskKeys.generate()
    transport.to_pod(
        victim,
        Envelope(
            "MODELLER_RESPONSE",
            seal(victim_keys.aes_key, VICTIM_BODY, associated_data(victim, "MODELLER_RESPONSE")),
        ),
    )
    run = AttackRun(runtime)
    started = threading.Event()
    done = threading.Event()
    fds: dict[str, tuple[int, int]] = {}  # mark -> (the parent's open files, its connections of the attacker)
    attacker_socket: list[Path] = []
    attacker_pid: list[int] = []  # the attacker container's first process, on the host
    innocent_errors: list[str] = []
    current: list[str] = []  # the attack in progress
    stuck: list[str] = []  # where the attacker's main thread was when an attack ran long

    def attacker_connections() -> int:
        # The parent's ends of the attacker's connections live in the network
        # namespace of the container's processes (the gofer's, under runsc).
        return connections_of(attacker_socket[0], cgroup_pids(attacker_pid[0]) or attacker_pid)

    def on_progress(update: Any) -> None:
        if update.info == MARK_START:
            # The innocent tasks start after this mark: the only socket is the attacker's.
            attacker_socket[:] = list(run_dir.rglob(SOCKET_NAME))
            containers = docker_client.containers.list(filters={"label": f"{LABEL_TASK}={task_id}"})
            attacker_pid[:] = [c.attrs["State"]["Pid"] for c in containers]
            if len(attacker_socket) != 1 or len(attacker_pid) != 1:
                run.host_failures.setdefault("connection_flood", []).append(
                    f"expected the attacker's socket and container alone at its start, found "
                    f"{attacker_socket} and {len(attacker_pid)} containers"
                )
        if (
            update.info in (MARK_BEFORE, MARK_HELD, MARK_RELEASED)
            and len(attacker_socket) == len(attacker_pid) == 1
        ):
            connections = attacker_connections()
            if update.info == MARK_RELEASED and MARK_BEFORE in fds:
                # The parent closes its side once it reads each close: give it a moment.
                deadline = time.monotonic() + 10.0
                while connections != fds[MARK_BEFORE][1] and time.monotonic() < deadline:
                    time.sleep(0.1)
                    connections = attacker_connections()
            fds[update.info] = (open_files(), connections)
        if update.info in (MARK_CPU_START, MARK_CPU_END):
            run.parent_cpu[update.info] = time.process_time()
        if update.info.startswith(MARK_ATTACK):
            current[:] = [update.info[len(MARK_ATTACK) :]]
        if update.info.startswith(MARK_STUCK):
            stuck.append(update.info[len(MARK_STUCK) :])
        if update.info == MARK_START:
            started.set()

    def innocent_loop() -> None:
        started.wait(300)
        try:
            while True:
                run.innocents.append(
                    executor.run(
                        TaskSpec(protocol_dir=PROTOCOLS / "async_run", data_dir=data, parameters={"n": 1})
                    )
                )
                if done.is_set():
                    return
        except Exception as exc:  # the parent failed another task: that is the finding
            innocent_errors.append(f"{type(exc).__name__}: {exc}")

    spec = TaskSpec(
        protocol_dir=PROTOCOLS / "rpc_attacks",
        data_dir=data,
        task_id=task_id,
        project_id=ATTACKER_PROJECT,
        parameters={
            "limits": _limits(),
            "victim_task_id": victim,
            "host_run_dir": str(run_dir),
            "bulk_reuse_size": BULK_REUSE_SIZE,
            # gVisor's sentry ends the sandbox somewhere below 2700 host connections.
            "connections": {"processes": 2, "per_process": 600},
        },
    )
    innocents = threading.Thread(target=innocent_loop, name="innocent-tasks", daemon=True)
    innocents.start()
    t0 = time.monotonic()
    try:
        try:
            run.outcome = executor.run(spec, on_progress=on_progress)
        finally:
            done.set()
            started.set()
            innocents.join(300)
        run.seconds = time.monotonic() - t0
        # The parent is still alive and serving other tasks after the attacker.
        run.innocents.append(
            executor.run(TaskSpec(protocol_dir=PROTOCOLS / "async_run", data_dir=data, parameters={"n": 1}))
        )
        outcome = run.outcome
        during = f" during the {current[0]} attack" if current else " before its first attack"
        if stuck:
            during += f" (stuck: {'; '.join(stuck)})"
        assert outcome.status is Status.OK, (
            f"the attacker task ended {outcome.status.value}{during}: {outcome.error} "
            f"(result {outcome.result!r})"
        )
        assert isinstance(outcome.result, dict), f"forged result: {outcome.result!r}"
        run.results = outcome.result
        assert not innocents.is_alive(), "innocent tasks still running 300 s after the attacker"
        assert not innocent_errors, f"an innocent task could not run: {innocent_errors}"
        assert len(run.innocents) >= 2, "no innocent task ran beside the attacker"
        for o in run.innocents:
            assert o.status is Status.OK, f"an innocent task ended {o.status.value}: {o.error}"
            assert o.result == INNOCENT_RESULT, f"an innocent task returned {o.result!r}"
        _host_evidence(run, transport, task_id, victim, victim_keys.aes_key, fds)
        yield run
    finally:
        leaked = [
            c.name
            for c in docker_client.containers.list(
                all=True, filters={"label": f"{LABEL_PARENT}={executor.instance_id}"}
            )
        ]
        for name in leaked:
            docker_client.containers.get(name).remove(force=True)
        left = sorted(str(p) for p in run_dir.iterdir())
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(spool_dir, ignore_errors=True)
        transport.close()
        assert not leaked, f"containers left behind: {leaked}"
        assert not left, f"task directories left behind: {left}"


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("attack_run", RUNTIMES, indirect=True)
def test_attack_held(attack_run: AttackRun, attack: str, request: pytest.FixtureRequest) -> None:
    if attack_run.unavailable:
        pytest.fail(attack_run.unavailable)
    if attack in KNOWN_HOLES:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_HOLES[attack], strict=True, raises=AssertionError))
    assert attack in attack_run.results, f"the protocol did not run {attack}: {sorted(attack_run.results)}"
    result = attack_run.results[attack]
    problems = attack_run.host_failures.get(attack, [])
    detail = result["detail"]
    notes = attack_run.host_notes.get(attack, [])
    if notes:
        detail += " | " + "; ".join(notes)
    # Both at once, so that a failure shows everything that went wrong.
    failures = [] if result["held"] else [f"did not hold: {detail}"]
    if problems:
        failures.append(f"host-side evidence: {'; '.join(problems)}")
    assert not failures, f"{attack_run.runtime}/{attack} " + " | ".join(failures)


@pytest.mark.parametrize("attack_run", RUNTIMES, indirect=True)
def test_every_attack_ran(attack_run: AttackRun) -> None:
    if attack_run.unavailable:
        pytest.fail(attack_run.unavailable)
    # A summary for the log (pytest -rP shows it).
    print(
        f"{attack_run.runtime}: attacker ran {attack_run.seconds:.1f} s beside "
        f"{len(attack_run.innocents)} innocent tasks (all OK)"
    )
    for name, result in attack_run.results.items():
        notes = "; ".join(attack_run.host_notes.get(name, []))
        verdict = "held" if result["held"] else "HOLE"
        print(f"  {verdict} {name} ({result['seconds']} s): {result['detail']} {notes}")
    assert sorted(attack_run.results) == sorted(ATTACKS)
    assert len(ATTACKS) >= 12
