"""README promises on real containers: policy keys applied, what the sandbox sees, mail rules.

Each test names the promise it holds. Inside facts come from the ``promises``
protocol; engine facts from inspecting the container while its protocol is
blocked in a progress call (the callback runs before that call returns, so
the container is certainly running).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import docker.errors
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from executor.backends import LABEL_MANAGED, LABEL_PARENT, LABEL_TASK
from executor.backends.docker import DockerBackend
from executor.mailbox.crypto import TaskKeys, seal_share, share_label
from executor.mailbox.transport import Envelope, Route
from executor.outcome import Status
from executor.policy import DEFAULT_IMAGE, IsolationPolicy
from executor.policy.file import load_policy_file
from executor.spec import TaskSpec
from executor.task.taskdir import OWNER_NAME, TOKEN_NAME

from ..conftest import PROTOCOLS, reused_pid_owner

if TYPE_CHECKING:
    from executor.events import ProgressUpdate

pytestmark = pytest.mark.integration

PROMISES = PROTOCOLS / "promises"
MiB = 1024 * 1024
KiB = 1024
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


# -- policy keys and the sandbox's view, in one running container --------------------


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_policy_keys_and_the_sandboxs_view_hold_in_a_running_container(
    make_executor, docker_client, run_dir, two_files, runtime
):
    if runtime not in docker_client.info().get("Runtimes", {}):
        pytest.fail(f"the {runtime} runtime is not registered with the engine: run `make runsc`")
    # runc: one pinned uid; runsc: a range of two away from the default.
    uids = {"uid": 23_456} if runtime == "runc" else {"uid_start": 30_001, "uid_count": 2}
    policy = IsolationPolicy.hardened().replace(runtime=runtime, cpus=0.5, memory_mb=256, **uids)
    task_id = f"promises-{runtime}-{uuid.uuid4().hex[:8]}"
    events: list[ProgressUpdate] = []
    seen: dict = {}

    def on_progress(event: ProgressUpdate) -> None:
        events.append(event)
        if event.kind != "RUN_START":
            return
        (container,) = docker_client.containers.list(filters={"label": f"{LABEL_TASK}={task_id}"})
        seen["attrs"] = container.attrs
        (token_file,) = run_dir.glob(f"*/ipc/{TOKEN_NAME}")
        seen["token"] = token_file.read_text().strip()

    outcome = make_executor(policy=policy).run(
        TaskSpec(protocol_dir=PROMISES, data_dir=two_files, task_id=task_id, modeller_name="modeller-alice"),
        on_progress=on_progress,
    )
    assert outcome.status is Status.OK, outcome.error
    inside = outcome.result
    host = seen["attrs"]["HostConfig"]
    config = seen["attrs"]["Config"]

    # `cpus` is a CPU quota; memory includes swap (memswap == memory).
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 256 * MiB
    if runtime == "runc":  # gVisor shows no host cgroup files inside
        cg = inside["cgroup"]
        if "cpu.max" in cg:
            assert cg["cpu.max"].split() == ["50000", "100000"]
        else:
            assert int(cg["cfs_quota_us"]) * 2 == int(cg["cfs_period_us"])
        if "memory.swap.max" in cg:
            assert cg["memory.swap.max"] == "0"
        else:
            assert int(cg["memory.memsw.limit_in_bytes"]) == int(cg["memory.limit_in_bytes"]) == 256 * MiB

    # A non-default uid (pinned, or from a non-default range), the shared group.
    if runtime == "runc":
        assert inside["uid"] == 23_456
    else:
        assert inside["uid"] in (30_001, 30_002)
    assert inside["gid"] == 10_001

    # /tmp: noexec everywhere; nosuid and nodev as the kernel shows them under
    # runc (gVisor's own kernel lists only noexec for it, see the README).
    assert inside["tmp"]["fstype"] == "tmpfs"
    assert "noexec" in inside["tmp"]["options"]
    if runtime == "runc":
        assert {"nosuid", "nodev"} <= set(inside["tmp"]["options"])

    # scratch_dir: writable, memory-backed, not executable.
    scratch = inside["scratch"]
    assert scratch["written"] == "written"
    assert scratch["executed"] == "EACCES"
    assert scratch["mount"]["fstype"] == "tmpfs"
    assert "noexec" in scratch["mount"]["options"]

    assert inside["modeller_name"] == "modeller-alice"

    # The token: not in labels, command line or environment, seen from outside
    # and from inside (every process's cmdline and environ it may read).
    token = seen["token"]
    assert len(token) >= 32
    attrs = seen["attrs"]
    outside = json.dumps(
        [config.get(k) for k in ("Labels", "Cmd", "Entrypoint", "Env")]
        + [attrs.get("Args"), attrs.get("Path")]
    )
    assert token not in outside
    assert inside["token"] == {"token_read": True, "seen_in": []}

    # Epoch progress end to end, in order, with current and max epochs. Steps
    # are coalesced (at most 4 a second, the latest kept), boundaries never:
    # each epoch shows its last step, and perhaps its first.
    got = [(e.kind, e.current_epoch, e.max_epochs, e.current, e.total, e.info) for e in events]
    boundaries = [g for g in got if g[0] != "STEP"]
    assert boundaries == [("RUN_START", 0, 0, 0, 0, "")] + [
        (kind, epoch, 2, 0, 0, "") for epoch in (1, 2) for kind in ("EPOCH_START", "EPOCH_END")
    ] + [("RUN_END", 0, 0, 0, 0, "")]
    for epoch in (1, 2):
        start = got.index(("EPOCH_START", epoch, 2, 0, 0, ""))
        end = got.index(("EPOCH_END", epoch, 2, 0, 0, ""))
        steps = got[start + 1 : end]
        assert steps, got
        assert steps[-1] == ("STEP", epoch, 2, 2, 2, "batch 2"), got
        assert set(steps) <= {("STEP", epoch, 2, step, 2, f"batch {step}") for step in (1, 2)}, got

    # ctx.file_processed / file_failed reach the outcome and its JSON.
    assert outcome.files == {"good.csv": ("PROCESSED", ""), "bad.csv": ("FAILED", "unparsable row 3")}
    assert outcome.to_dict()["files"] == {"processed": 1, "failed": {"bad.csv": "unparsable row 3"}}


def _allow_all_but(refused: set[str]) -> str:
    """An allow-list seccomp profile: every x86-64 syscall but ``refused``, refusing by default."""
    if not UNISTD.is_file():
        pytest.fail(f"{UNISTD} is missing (Debian's linux-libc-dev): it lists the syscalls to allow")
    names = sorted(set(re.findall(r"#define __NR_(\w+) \d+", UNISTD.read_text())) - refused)
    assert len(names) > 300
    assert not refused & set(names)
    return json.dumps(
        {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]}
    )


def test_a_seccomp_profile_from_a_policy_file_refuses_what_it_leaves_out(make_executor, data_dir, tmp_path):
    (tmp_path / "strict.json").write_text(_allow_all_but({"symlink", "symlinkat"}))
    policy_path = tmp_path / "policy.toml"
    policy_path.write_text('[projects.strict]\nseccomp_profile = "strict.json"\n')
    executor = make_executor(policies=load_policy_file(policy_path))
    results = {}
    for project in ("strict", "default"):
        outcome = executor.run(
            TaskSpec(
                protocol_dir=PROMISES, data_dir=data_dir, project_id=project, parameters={"mode": "symlink"}
            )
        )
        assert outcome.status is Status.OK, outcome.error
        results[project] = outcome.result["symlink"]
    # The same call succeeds under the engine's default profile.
    assert results == {"strict": "EPERM", "default": "made"}


def test_max_task_mb_refuses_a_task_that_moves_more(make_executor, data_dir):
    policy = IsolationPolicy.hardened().replace(max_task_mb=1)
    outcome = make_executor(policy=policy).run(
        TaskSpec(
            protocol_dir=PROMISES, data_dir=data_dir, parameters={"mode": "send", "sizes": [600 * KiB] * 2}
        )
    )
    assert outcome.status is Status.OK, outcome.error
    # Each message is far under max_message_mb; together they pass 1 MiB.
    assert outcome.result == {"sent": ["sent", "RESOURCE_EXHAUSTED"]}


def test_a_max_result_mb_override_is_the_result_cap(make_executor, data_dir):
    cap_mb = 0.01  # 10,485 bytes, far below the 1 MiB default
    executor = make_executor(policy=IsolationPolicy.hardened().replace(max_result_mb=cap_mb))
    outcomes = {}
    for size in (5_000, 20_000):
        spec = TaskSpec(
            protocol_dir=PROMISES, data_dir=data_dir, parameters={"mode": "result", "bytes": size}
        )
        outcomes[size] = executor.run(spec)
    assert outcomes[5_000].status is Status.OK, outcomes[5_000].error
    assert outcomes[5_000].result == "x" * 5_000
    over = outcomes[20_000]
    assert over.status is Status.ERROR
    assert over.error is not None
    assert over.error.type == "ResultTooLarge"


# -- supervision: the modeller is told, retries on start, the implicit reap ----------


@pytest.mark.parametrize(
    ("protocol", "limits", "error_type"),
    [
        ("sleeps", {"timeout_s": 2}, "TimeoutError"),
        ("busy_stuck", {"heartbeat_interval_s": 0.2, "stall_timeout_s": 1.5}, "StallTimeout"),
    ],
)
def test_a_timeout_sends_the_modeller_task_abort_with_limits_exceeded(
    make_executor, modeller, data_dir, protocol, limits, error_type
):
    task_id = f"limits-{uuid.uuid4().hex[:8]}"
    keys = TaskKeys.generate()
    modeller.add_task(task_id, keys)
    executor = make_executor(
        policy=IsolationPolicy.hardened().replace(**limits), transport=modeller.transport
    )
    outcome = executor.run(
        TaskSpec(protocol_dir=PROTOCOLS / protocol, data_dir=data_dir, task_id=task_id, keys=keys)
    )
    assert outcome.status is Status.TIMEOUT
    assert outcome.error is not None
    assert outcome.error.type == error_type
    abort = modeller.receive(task_id, timeout=5)
    assert abort is not None
    assert abort.type == "TASK_ABORT"
    body = json.loads(abort.read())
    assert (body["reason"], body["exception_type"]) == ("LimitsExceeded", error_type)


class FlakyStartBackend(DockerBackend):
    """The real engine, except that the first container start fails with an HTTP 500."""

    def __init__(self) -> None:
        super().__init__(retry_base_s=0.01)
        self.start_attempts = 0

    def _api(self):
        api = super()._api()
        backend = self

        class Api:
            def __getattr__(self, name):
                return getattr(api, name)

            def start(self, container_id):
                backend.start_attempts += 1
                if backend.start_attempts == 1:
                    response = requests.Response()
                    response.status_code = 500
                    raise docker.errors.APIError("injected", response=response, explanation="engine hiccup")
                return api.start(container_id)

        return Api()


def test_a_start_that_fails_with_a_server_error_is_retried(make_executor, data_dir, caplog):
    backend = FlakyStartBackend()
    caplog.set_level(logging.WARNING, logger="executor.backends.docker")
    outcome = make_executor(backend=backend).run(
        TaskSpec(protocol_dir=PROMISES, data_dir=data_dir, parameters={"mode": "result", "bytes": 3})
    )
    assert outcome.status is Status.OK, outcome.error
    assert backend.start_attempts == 2
    assert any("container start failed (engine hiccup); retrying" in r.getMessage() for r in caplog.records)


def test_an_executors_first_task_reaps_what_dead_executors_left(
    make_executor, docker_client, data_dir, run_dir
):
    dead = reused_pid_owner()
    # Other hosts' ids count as alive: this one must name this host.
    assert dead.split(":")[0] == socket.gethostname()
    orphan = docker_client.containers.create(
        DEFAULT_IMAGE,
        ["true"],
        labels={LABEL_MANAGED: "true", LABEL_PARENT: dead, LABEL_TASK: "orphan"},
        network_mode="none",
    )
    try:
        orphan_dir = run_dir / "t-orphan"
        orphan_dir.mkdir()
        (orphan_dir / OWNER_NAME).write_text(dead)
        outcome = make_executor().run(
            TaskSpec(protocol_dir=PROMISES, data_dir=data_dir, parameters={"mode": "result", "bytes": 3})
        )
        assert outcome.status is Status.OK, outcome.error
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(orphan.id)
        assert not orphan_dir.exists()
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            orphan.remove(force=True)


# -- mail rules: shares and the modeller's TASK_START --------------------------------


def test_a_share_from_a_non_peer_or_a_second_from_one_peer_is_dropped(
    make_executor, modeller, data_dir, caplog
):
    task_id = f"shares-{uuid.uuid4().hex[:8]}"
    me = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    peer_keys = {
        p: rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        for p in ("pod-b", "pod-c")
    }
    transport = modeller.transport

    def share_from(sender: str, text: str) -> None:
        # Sealed correctly for this task and pod: only who sent it is wrong.
        sealed = seal_share(me.public_key(), text.encode(), share_label(task_id, sender, "pod-a"))
        transport.open(Route(task_id, sender, peers=("pod-a",))).send(
            Envelope("SECURE_SHARE", sealed, peer="pod-a")
        )

    # Queued before the task starts, in this order.
    share_from("pod-x", "from a pod outside the task")
    share_from("pod-b", "b, first")
    share_from("pod-b", "b, second")
    share_from("pod-c", "c")
    caplog.set_level(logging.WARNING, logger="executor.mailbox.broker")
    spec = TaskSpec(
        protocol_dir=PROMISES,
        data_dir=data_dir,
        task_id=task_id,
        pod_identifier="pod-a",
        pod_identifiers=("pod-a", "pod-b", "pod-c"),
        keys=TaskKeys(aes_key=os.urandom(32), pod_private_key=me, peer_public_keys=peer_keys),
        parameters={"mode": "get_shares", "timeout": 30},
    )
    outcome = make_executor(transport=transport).run(spec)
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == {"pod-b": "b, first", "pod-c": "c"}
    dropped = [r.getMessage() for r in caplog.records if "dropped a secure share" in r.getMessage()]
    assert any("'pod-x'" in m for m in dropped)
    assert any("'pod-b'" in m for m in dropped)


def test_a_forged_task_start_does_not_make_the_modeller_ready(make_executor, modeller, data_dir, caplog):
    caplog.set_level(logging.ERROR, logger="executor.mailbox.broker")
    ready = {}
    for sealed_with in ("another key", "the task key"):
        task_id = f"ready-{uuid.uuid4().hex[:8]}"
        keys = TaskKeys.generate()
        modeller.add_task(task_id, keys if sealed_with == "the task key" else TaskKeys.generate())
        modeller.ready(task_id)  # the modeller's TASK_START, sealed with `sealed_with`
        outcome = make_executor(transport=modeller.transport).run(
            TaskSpec(
                protocol_dir=PROMISES,
                data_dir=data_dir,
                task_id=task_id,
                keys=keys,
                parameters={"mode": "ready", "timeout": 3},
            )
        )
        assert outcome.status is Status.OK, outcome.error
        ready[sealed_with] = outcome.result["ready"]
    assert ready == {"another key": False, "the task key": True}
    assert any("TASK_START failed authentication" in r.getMessage() for r in caplog.records)
