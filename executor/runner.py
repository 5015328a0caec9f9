"""Run one task in one container: the parent side's entry point.

:meth:`Executor.run` validates the task, makes its directory, token and gRPC
server, creates one hardened container, waits for the sandbox's result or the
container's end, and returns an :class:`~executor.outcome.Outcome`. The
container, the socket and the directory are removed whatever happened.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from executor import serde
from executor.backends import ContainerBackend
from executor.bundle import check_protocol_dir, copy_bundle
from executor.errors import ConfigurationError, DataSourceError, host_errors
from executor.events import ControlKind, ProgressUpdate
from executor.launch import container_spec
from executor.lifeline import Lifeline
from executor.mailbox.broker import MailboxBroker
from executor.mailbox.crypto import TaskKeys
from executor.mailbox.transport import NoModellerTransport, Route, Transport
from executor.outcome import Outcome
from executor.policy import IsolationPolicy
from executor.policy_file import PolicySet
from executor.reaper import ReapReport, new_instance_id, reap
from executor.rpc.server import TaskServer
from executor.rpc.session import TaskSession
from executor.spec import TaskSpec
from executor.supervisor import Supervisor, abort_message
from executor.taskdir import TaskDir, default_base_dir, default_spool_dir
from executor.uids import UidPool

log = logging.getLogger(__name__)


def check_data_dir(path: Path, uid: int | None, gid: int) -> Path:
    """The resolved data directory, if the sandbox (``uid:gid``) can list and read it.

    Only the directory's own mode matters: it is bind-mounted, so the sandbox
    never traverses its host ancestors. The kernel's rule applies: the owner's
    bits if ``uid`` owns it, else the group's if ``gid`` is its group, else
    the others'. ``uid`` is ``None`` when each task gets a uid of its own from
    the policy's range: then the shared group, or the others, must grant it.

    Raises:
        DataSourceError: It does not exist, is not a directory, or is closed to
            the sandbox's uid and gid.
    """
    resolved = path.resolve()
    if not resolved.is_dir():
        raise DataSourceError(f"data directory {path} does not exist or is not a directory")
    st = resolved.stat()
    if uid is not None and st.st_uid == uid:
        bits = (st.st_mode >> 6) & 0o7
    elif st.st_gid == gid:
        bits = (st.st_mode >> 3) & 0o7
    else:
        bits = st.st_mode & 0o7
    if bits & 0o5 != 0o5:
        who = f"uid {uid}, group {gid}" if uid is not None else f"a uid of each task's own, group {gid}"
        raise DataSourceError(
            f"data directory {path} (mode {stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}:{st.st_gid}) "
            f"is not readable by the sandbox user ({who}); grant read and search to the sandbox "
            f"group (chgrp {gid} and chmod g+rx) or to others (chmod o+rx), or change the policy's gid"
        )
    return resolved


class Executor:
    """Runs tasks, one hardened container each.

    Args:
        backend: The container engine; by default Docker from the environment.
        policy: One isolation policy for every task.
        policies: Per-project policies (from a policy file); ``policy`` wins if both.
        transport: Where mailbox traffic goes. By default there is no modeller:
            a :class:`~executor.mailbox.transport.NoModellerTransport`, which discards
            and counts what a task sends and fails its receives at once.
        run_dir: Where task directories go; see :func:`default_base_dir`.
        spool_dir: Where large mailbox bodies are staged (disk, not memory);
            see :func:`default_spool_dir`.
        uid_dir: Where the host-wide uid leases live; see
            :func:`~executor.uids.default_uid_dir`.
    """

    def __init__(
        self,
        backend: ContainerBackend | None = None,
        *,
        policy: IsolationPolicy | None = None,
        policies: PolicySet | None = None,
        transport: Transport | None = None,
        run_dir: Path | None = None,
        spool_dir: Path | None = None,
        uid_dir: Path | None = None,
    ) -> None:
        if backend is None:
            from executor.backends.docker import DockerBackend

            backend = DockerBackend()
        self.backend = backend
        self.policies = policies or PolicySet(default=policy or IsolationPolicy.hardened())
        self._single_policy = policy
        self._owns_transport = transport is None
        self.transport: Transport = transport if transport is not None else NoModellerTransport()
        self.run_dir = run_dir or default_base_dir()
        self.spool_dir = spool_dir or default_spool_dir()
        self.uids = UidPool(uid_dir)
        self.instance_id = new_instance_id()
        self._reaped = False
        self._reap_lock = threading.Lock()

    @property
    def policy(self) -> IsolationPolicy:
        """The default policy (every project's, unless a policy file says otherwise)."""
        return self.policies.default

    def policy_for(self, project: str) -> IsolationPolicy:
        """The effective isolation policy of ``project``."""
        if self._single_policy is not None:
            return self._single_policy
        return self.policies.for_project(project)

    def close(self) -> None:
        """Release what this executor made itself (its default transport).

        A transport the caller passed in stays the caller's to close.
        """
        close = getattr(self.transport, "close", None)
        if self._owns_transport and callable(close):
            close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _task_dir(self, uid: int, gid: int) -> TaskDir:
        """A fresh task directory under :attr:`run_dir`.

        Raises:
            HostError: The host refused to make it (e.g. the run directory is not writable).
        """
        with host_errors("make a task directory in", self.run_dir):
            return TaskDir(self.run_dir, uid, self.instance_id, sandbox_gid=gid)

    def reap(self, *, everything: bool = False) -> ReapReport:
        """Remove containers, task directories and spools of dead executors.

        Runs once by itself before this executor's first task.

        Raises:
            BackendError: The engine could not list or remove containers.
            HostError: The host refused to list the run or spool directory.
        """
        return reap(self.backend, self.run_dir, self.spool_dir, everything=everything)

    def run(
        self,
        spec: TaskSpec,
        *,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Outcome:
        """Run one task to its end.

        Args:
            spec: The task.
            on_progress: Called from a server thread for each progress event.
            cancel: Set it to stop the task; the outcome is then CANCELLED.

        Returns:
            The outcome. A protocol that fails is an outcome, not an exception.

        Raises:
            ConfigurationError: The protocol, data or task is unusable.
            BackendError: The engine is unreachable, the image is missing, or
                the container could not be created or started.
            CapacityError: Every sandbox uid of the policy's range is held by
                a live task; nothing was started.
            HostError: The host refused the task directory, the mailbox
                spool, a socket, the uid lock directory, or listing the run
                or spool directory for leftovers; what was made is removed.
        """
        started = time.monotonic()
        policy = self.policy_for(spec.project_id)
        secrets = resolve_secrets(policy)
        task_id = spec.task_id or uuid.uuid4().hex
        check_protocol_dir(spec.protocol_dir)
        data_dir = check_data_dir(spec.data_dir, policy.uid, policy.gid)
        self.backend.check_image(policy.image)
        with self._reap_lock:
            if not self._reaped:
                self.reap()
                self._reaped = True
        # A uid no other live task has (kernel per-user pools are then per task),
        # held until the container is gone and the task directory removed.
        with (
            self.uids.lease(policy) as lease,
            self._task_dir(lease.uid, policy.gid) as task_dir,
        ):
            policy = policy.replace(uid=lease.uid)
            bundle = copy_bundle(spec.protocol_dir, task_dir.protocol)
            peers = tuple(p for p in spec.pod_identifiers if p != spec.pod_identifier)
            route = Route(task_id, spec.pod_identifier, spec.modeller_name, peers)
            spool = self.spool_dir / task_dir.path.name
            channel = self.transport.open(route)
            try:
                with host_errors("make the mailbox spool", spool):
                    broker = MailboxBroker(
                        route,
                        channel,
                        spec.keys or TaskKeys.generate(),
                        spool,
                        max_message_bytes=policy.max_message_bytes,
                        max_task_bytes=policy.max_task_bytes,
                        owner=self.instance_id,
                    )
            except BaseException:
                channel.close()
                raise
            wake = threading.Event()
            session = TaskSession(
                task_id,
                serde.task_config(spec, task_id, bundle, policy, secrets),
                broker,
                max_result_bytes=policy.max_result_bytes,
                on_progress=on_progress,
                on_finish=wake.set,
                data_dir=data_dir,
            )
            try:
                with host_errors("listen on", task_dir.socket_path):
                    server = TaskServer(session, task_dir.token, task_dir.socket_path)
            except BaseException:
                broker.close()  # its spool and channel, before the error goes up
                raise
            server.start()
            broker.watch_ready(lambda: session.send_control(ControlKind.MODELLER_READY))
            lifeline: Lifeline | None = None
            try:
                # Held for the task's life: when this process goes, so does the sandbox.
                with host_errors("listen on", task_dir.lifeline_path):
                    lifeline = Lifeline(task_dir.lifeline_path)
                lifeline.start()
                with host_errors("hand to the sandbox user", task_dir.ipc):
                    task_dir.grant_to_sandbox()
                container = container_spec(
                    task_id=task_id,
                    project_id=spec.project_id,
                    instance_id=self.instance_id,
                    policy=policy,
                    task_dir=task_dir,
                    bundle_path=bundle.path,
                    data_dir=data_dir,
                )
                supervisor = Supervisor(
                    self.backend,
                    container,
                    session,
                    wake,
                    cancel,
                    notify_abort=lambda reason, kind, message: broker.send_abort(
                        abort_message(reason, kind, message)
                    ),
                )
                outcome = supervisor.run()
                outcome.timings["total"] = time.monotonic() - started
                return dataclasses.replace(outcome, files=session.file_outcomes())
            finally:
                broker.close()
                server.stop()
                if lifeline is not None:
                    lifeline.close()


def resolve_secrets(policy: IsolationPolicy) -> dict[str, str]:
    """The values of the secrets ``policy`` grants, read in the parent.

    Raises:
        ConfigurationError: A granted secret's variable or file is missing.
    """
    values: dict[str, str] = {}
    for name, source in policy.secrets:
        kind, _, ref = source.partition(":")
        if kind == "env":
            if ref not in os.environ:
                raise ConfigurationError(f"secret {name}: environment variable {ref} is not set")
            values[name] = os.environ[ref]
        else:
            try:
                values[name] = Path(ref).read_text().strip()
            except OSError as exc:
                raise ConfigurationError(f"secret {name}: cannot read {ref} ({exc.strerror})") from None
    return values
