"""One sandbox's host side, assembled the same way for a cold batch and a warm slot.

In order: the gRPC server (and its bulk path) on the task directory's socket,
the lifeline the sandbox's init will hold, for a warm slot the start line its
runtime waits on, the IPC directory handed to the sandbox user, and the
container spec (:func:`~executor.task.launch.container_spec`): the only host
paths the container sees. What the host refuses is a
:class:`~executor.errors.HostError` naming the path; whatever was made before
a failure is closed again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from executor.errors import host_errors
from executor.rpc.server import TaskServer
from executor.task.launch import container_spec
from executor.task.lifeline import Lifeline, StartLine

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from executor.backends import ContainerSpec, Mount
    from executor.policy import IsolationPolicy
    from executor.rpc.session import SessionRef, TaskSession
    from executor.task.taskdir import TaskDir


@dataclass
class Assembly:
    """A sandbox's listening host side and the container that will connect to it."""

    server: TaskServer
    lifeline: Lifeline
    start: StartLine | None
    spec: ContainerSpec

    def close(self, grace: float = 1.0) -> None:
        """Stop the server, close the start line and the lifeline (which ends the sandbox)."""
        try:
            self.server.stop(grace=grace)
        finally:
            if self.start is not None:
                self.start.close()
            self.lifeline.close()


def assemble(
    task_dir: TaskDir,
    session: TaskSession | SessionRef,
    *,
    name: str,
    project_id: str,
    instance_id: str,
    policy: IsolationPolicy,
    bundle_path: Path,
    data_mounts: list[Mount],
    max_result_bytes: int | None = None,
    on_waiting: Callable[[], None] | None = None,
) -> Assembly:
    """Listen for one sandbox in ``task_dir`` and describe its container.

    Args:
        task_dir: The sandbox's directory (its IPC part fresh).
        session: The task's session, or a warm slot's unbound reference.
        name: The task id (or the slot's name), for the container's name and labels.
        project_id: The task's project (empty for a warm slot).
        instance_id: The executor instance, for the reaper's label.
        policy: The sandbox's policy, its ``uid`` the one the sandbox runs as.
        bundle_path: What is mounted at the bundle's place.
        data_mounts: The data view's mounts (see :class:`~executor.data.view.DataView`).
        max_result_bytes: The server's result cap; by default the session's.
        on_waiting: Given for a warm slot: its runtime waits on a start line
            for its task, and this is called once it connects.

    Raises:
        HostError: The host refused a socket or handing the IPC directory over.
    """
    with host_errors("listen on", task_dir.socket_path):
        server = TaskServer(session, task_dir.token, task_dir.socket_path, max_result_bytes=max_result_bytes)
    made: list[TaskServer | Lifeline] = [server]
    try:
        server.start()
        # Held for the sandbox's life: when this process goes, so does the sandbox.
        with host_errors("listen on", task_dir.lifeline_path):
            lifeline = Lifeline(task_dir.lifeline_path)
        made.append(lifeline)
        lifeline.start()
        start: StartLine | None = None
        warm = on_waiting is not None
        if warm:
            with host_errors("listen on", task_dir.start_path):
                start = StartLine(task_dir.start_path, on_connect=on_waiting)
            made.append(start)
            start.start()
        with host_errors("hand to the sandbox user", task_dir.ipc):
            task_dir.grant_to_sandbox()
        spec = container_spec(
            task_id=name,
            project_id=project_id,
            instance_id=instance_id,
            policy=policy,
            task_dir=task_dir,
            bundle_path=bundle_path,
            data_mounts=data_mounts,
            warm=warm,
        )
    except BaseException:
        for thing in reversed(made):
            with contextlib.suppress(Exception):
                if isinstance(thing, TaskServer):
                    thing.stop(grace=0)
                else:
                    thing.close()
        raise
    return Assembly(server, lifeline, start, spec)
