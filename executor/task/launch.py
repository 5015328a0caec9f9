"""What one task's container is: the sandbox's argv, its mounts and its labels.

The paths inside the sandbox are named once, in the wire contract
(:mod:`executor.sandbox.contract`); the task configuration
(:func:`executor.rpc.serde.task_config`) tells the runtime the same ones.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from executor.backends import (
    LABEL_MANAGED,
    LABEL_PARENT,
    LABEL_PROJECT,
    LABEL_TASK,
    LABEL_WARM,
    ContainerSpec,
    Mount,
)
from executor.sandbox.contract import SANDBOX_DATA, SANDBOX_IPC, SANDBOX_PROTOCOL
from executor.task.taskdir import LIFELINE_NAME, SOCKET_NAME, TOKEN_NAME

if TYPE_CHECKING:
    from pathlib import Path

    from executor.policy import IsolationPolicy
    from executor.task.taskdir import TaskDir

__all__ = ["SANDBOX_DATA", "SANDBOX_IPC", "SANDBOX_PROTOCOL", "container_spec", "sandbox_command"]

SANDBOX_RESOLV_CONF = "/etc/resolv.conf"


def sandbox_command(preload: tuple[str, ...] = (), *, warm: bool = False) -> list[str]:
    """Our own init (untraceable pid 1, tied to the parent by the lifeline), then the runtime.

    The runtime imports ``preload`` before it asks for its task. A ``warm``
    one (a pool's slot) waits for its task as long as its parent lives.
    """
    extra = [*(["--preload", ",".join(preload)] if preload else []), *(["--wait-for-task"] if warm else [])]
    # -P: no task-writable current directory on sys.path; -S: init needs
    # nothing from site-packages (the runtime does: grpc).
    return [
        "python3",
        "-P",
        "-S",
        "-m",
        "executor.sandbox.init",
        "--lifeline",
        f"{SANDBOX_IPC}/{LIFELINE_NAME}",
        "--",
        "python3",
        "-P",
        "-m",
        "executor.sandbox",
        "--socket",
        f"{SANDBOX_IPC}/{SOCKET_NAME}",
        "--token-file",
        f"{SANDBOX_IPC}/{TOKEN_NAME}",
        *extra,
    ]


def container_spec(
    *,
    task_id: str,
    project_id: str,
    instance_id: str,
    policy: IsolationPolicy,
    task_dir: TaskDir,
    bundle_path: Path,
    data_mounts: list[Mount],
    warm: bool = False,
) -> ContainerSpec:
    """The one container of a task: the only host paths it sees, labelled for the reaper.

    ``data_mounts`` put the task's data view at :data:`SANDBOX_DATA` (see
    :class:`executor.data.view.DataView`): the directory, plus one read-only
    bind mount per file when the view could not be made of hard links. A
    ``warm`` container (a pool's slot, see :mod:`executor.task.warmpool`) is made
    before its task is known: ``task_id`` names the slot, the bundle and data
    directories are still empty, its runtime waits for the task, and it
    carries the warm label.
    """
    return ContainerSpec(
        name=f"sandbox-{task_id[:40]}-{uuid.uuid4().hex[:6]}",
        command=sandbox_command(policy.preload, warm=warm),
        policy=policy,
        mounts=[
            Mount(task_dir.ipc, SANDBOX_IPC),
            Mount(bundle_path, SANDBOX_PROTOCOL),
            *data_mounts,
            Mount(task_dir.resolv_conf, SANDBOX_RESOLV_CONF),
        ],
        labels={
            LABEL_MANAGED: "true",
            LABEL_TASK: task_id,
            LABEL_PROJECT: project_id,
            LABEL_PARENT: instance_id,
            **({LABEL_WARM: "true"} if warm else {}),
        },
    )
