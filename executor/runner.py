"""Run tasks, one hardened container per batch: the parent side's entry point.

:meth:`Executor.run` validates the task, decides which datasource files it may
see (:mod:`executor.data.selection`, against the project store), and hands the
plan to a :class:`~executor.task.run.TaskRun`: per batch a fresh directory,
token, gRPC server, data view and container, supervised to its end. It returns
an :class:`~executor.outcome.Outcome`. Containers, sockets and directories are
removed whatever happened.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from executor import paths
from executor.backends import ContainerBackend, open_backend
from executor.data.scan import scan
from executor.data.stores import open_store
from executor.data.view import METHODS
from executor.errors import ConfigurationError, DataSourceError, host_errors
from executor.mailbox.transport import NoModellerTransport, Transport
from executor.policy import IsolationPolicy
from executor.policy.file import PolicySet
from executor.task.admission import STARTS_DIR_NAME, StartGate, default_max_starting
from executor.task.bundle import check_protocol_dir, copy_bundle
from executor.task.host import TaskHost
from executor.task.plan import default_task_hash, plan_task
from executor.task.reaper import ReapReport, instance_alive, new_instance_id, reap
from executor.task.run import TaskRun
from executor.task.taskdir import TaskDir
from executor.task.uids import UidPool
from executor.task.warmpool import WarmPool, WarmPools

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from executor.data.store import ProjectStore
    from executor.events import ProgressUpdate
    from executor.hooks import Hook
    from executor.outcome import Outcome
    from executor.spec import TaskSpec

log = logging.getLogger(__name__)

IMAGE_CHECK_S = 60.0
"""How long a successful check that a policy's image exists is trusted."""


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
        backend: The container engine; by default the registered default
            (:func:`~executor.backends.open_backend`: Docker from the environment).
        policy: One isolation policy for every task.
        policies: Per-project policies (from a policy file); ``policy`` wins if both.
        transport: Where mailbox traffic goes. By default there is no modeller:
            a :class:`~executor.mailbox.transport.NoModellerTransport`, which discards
            and counts what a task sends and fails its receives at once.
        run_dir: Where task directories go; see :func:`paths.run_dir`.
        spool_dir: Where large mailbox bodies are staged (disk, not memory);
            see :func:`paths.spool_dir`.
        uid_dir: Where the host-wide uid leases live; see
            :func:`~executor.task.uids.default_uid_dir`.
        db: The project store (a path, a URL for
            :func:`~executor.data.stores.open_store`, or an open one): the task ledger,
            processed and failed files, result rows. Without it nothing is
            recorded, and ``run_on_new_data_only`` is refused.
        view_method: How data views are made (:class:`~executor.data.view.DataView`):
            ``"auto"`` (hard links where the data shares the run directory's
            filesystem, else read-only bind mounts per file), ``"hardlink"``
            or ``"bind"``.
        hooks: Called with every typed event of every task (:mod:`executor.hooks`),
            each from a thread of its own: one that raises or blocks never
            fails or stalls a task. Tasks run at once may call a hook from
            several threads.
        warm: Keep warm pools (:mod:`executor.task.warmpool`) for the policies whose
            ``warm_pool`` is above 0: started by :meth:`warm_up`, or by the
            first task of the policy, and torn down by :meth:`close`. With
            ``False`` every task starts cold whatever its policy says. A policy
            with a warm pool and a pinned ``uid`` is refused (``PolicyError``).
        max_starting: Sandboxes that may be starting (created, booting, up to
            their first heartbeat) at once on this host
            (:mod:`executor.task.admission`); by default two per CPU. Other tasks
            wait in line, their wall clock not yet running.
        max_queued: Tasks of this executor that may wait in that line at once;
            one more is refused at once with ``CapacityError``. ``None`` (the
            default) bounds the line only by the callers.
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
        db: ProjectStore | Path | str | None = None,
        hooks: Sequence[Hook] = (),
        view_method: str = "auto",
        warm: bool = True,
        max_starting: int | None = None,
        max_queued: int | None = None,
    ) -> None:
        self.backend = backend if backend is not None else open_backend()
        self.policies = policies or PolicySet(default=policy or IsolationPolicy.hardened())
        self._single_policy = policy
        self._owns_transport = transport is None
        self.transport: Transport = transport if transport is not None else NoModellerTransport()
        self.run_dir = run_dir or paths.run_dir()
        self.spool_dir = spool_dir or paths.spool_dir()
        self.uids = UidPool(uid_dir)
        try:
            self.gate = StartGate(
                default_max_starting() if max_starting is None else max_starting,
                self.uids.lock_dir / STARTS_DIR_NAME,
                max_queued=max_queued,
            )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.db = open_store(db) if isinstance(db, Path | str) else db
        self.hooks: tuple[Hook, ...] = tuple(hooks)
        if view_method not in METHODS:
            raise ConfigurationError(
                f"view_method: expected one of {', '.join(METHODS)}, got {view_method!r}"
            )
        self.view_method = view_method
        self.instance_id = new_instance_id()
        self._reaped = False
        self._reap_lock = threading.Lock()
        self._warm = warm
        self._images_seen: dict[str, float] = {}
        for p in self._warm_policies():
            p.check_warm_pool()
        self._host = TaskHost(
            backend=self.backend,
            transport=self.transport,
            run_dir=self.run_dir,
            spool_dir=self.spool_dir,
            uids=self.uids,
            gate=self.gate,
            db=self.db,
            hooks=self.hooks,
            view_method=self.view_method,
            instance_id=self.instance_id,
        )
        self._pools = WarmPools(self._host, enabled=warm)

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
        """Tear the warm pools down and release what this executor made itself (its default transport).

        Every warm sandbox is destroyed (a task running in one it took keeps
        running to its end). A transport the caller passed in stays the
        caller's to close. Safe twice.
        """
        self._pools.close()
        close = getattr(self.transport, "close", None)
        if self._owns_transport and callable(close):
            close()

    def _warm_policies(self) -> list[IsolationPolicy]:
        """The distinct policies tasks may run under that ask for a warm pool."""
        candidates = (
            [self._single_policy]
            if self._single_policy is not None
            else [self.policies.default, *self.policies.projects.values()]
        )
        out: list[IsolationPolicy] = []
        for p in candidates:
            if p.warm_pool and p not in out:
                out.append(p)
        return out

    def pool_for(self, policy: IsolationPolicy) -> WarmPool | None:
        """The warm pool of ``policy`` (started now if it was not), or ``None`` if it has none."""
        return self._pools.get(policy)

    def warm_up(self, *, wait: float | None = None) -> bool:
        """Start the warm pool of every policy that asks for one; with ``wait``, until they are full.

        Args:
            wait: Seconds to wait for every slot of every pool to be booted and
                waiting for its task; ``None`` returns at once.

        Returns:
            Whether every pool is full (``True`` too when no policy asks for one).

        Raises:
            BackendError: The engine is unreachable, or a policy's image is missing or
                of another wire version.
            PolicyError: The engine's runtime would not enforce a policy (see
                :meth:`~executor.backends.ContainerBackend.check_runtime`).
            ProjectDatabaseError: The reap before the first task could not close
                dead executors' ledger rows.
        """
        policies = self._warm_policies() if self._warm else []
        for policy in policies:
            self._check_image(policy.image)
            self.backend.check_runtime(policy)
        self._reap_once()
        pools = [p for p in map(self.pool_for, policies) if p is not None]
        if wait is None:
            return all(p.stats()["ready"] >= p.size for p in pools)
        end = time.monotonic() + wait
        return all(p.wait_full(max(0.0, end - time.monotonic())) for p in pools)

    def pool_stats(self) -> list[dict[str, object]]:
        """What each warm pool holds and has done (see :meth:`WarmPool.stats`)."""
        return self._pools.stats()

    def _check_image(self, image: str) -> None:
        """Refuse a missing image before anything is made; an engine round trip, so at most once a minute.

        An image removed within the minute still fails the task clearly, at create.
        """
        now = time.monotonic()
        seen = self._images_seen.get(image)
        if seen is not None and now - seen < IMAGE_CHECK_S:
            return
        self.backend.check_image(image)
        self._images_seen[image] = now

    def _reap_once(self) -> None:
        with self._reap_lock:
            if not self._reaped:
                self.reap()
                self._reaped = True

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
            return TaskDir(self.run_dir, uid, self.instance_id, sandbox_gid=gid, ipc=False)

    def reap(self, *, everything: bool = False) -> ReapReport:
        """Remove containers, task directories and spools of dead executors.

        With a project database, their tasks' ledger rows left RUNNING are
        closed as ``LOST``. Runs once by itself before this executor's first
        task.

        Raises:
            BackendError: The engine could not list or remove containers.
            HostError: The host refused to list the run or spool directory.
            ProjectDatabaseError: The project database is unusable.
        """
        report = reap(self.backend, self.run_dir, self.spool_dir, everything=everything)
        if self.db is not None:
            report.lost_tasks = self.db.close_lost(instance_alive)
        return report

    def run(
        self,
        spec: TaskSpec,
        *,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Outcome:
        """Run one task to its end: every batch of its selection, one container each.

        Args:
            spec: The task.
            on_progress: Called for each progress event, from a server thread
                or the task's progress thread; steps are coalesced to at most
                one per ``PROGRESS_STEP_INTERVAL_S`` (:mod:`executor.task.eventflow`).
            cancel: Set it to stop the task; the outcome is then CANCELLED.

        Returns:
            The outcome. A protocol that fails is an outcome, not an exception.
            When it returns, every hook has been handed every event of the task
            (or was given up on after :data:`HOOK_DRAIN_S`).

        Raises:
            ConfigurationError: The protocol, data or task is unusable, or the
                engine's runtime would not enforce the policy (``PolicyError``:
                a seccomp profile under a runsc registered without --oci-seccomp).
            BackendError: The engine is unreachable, the image is missing or of
                another wire version, or
                the container could not be created or started.
            CapacityError: Every sandbox uid of the policy's range is held by
                a live task; nothing was started.
            HostError: The host refused the task directory, the mailbox
                spool, a socket, the uid lock directory, or listing the run
                or spool directory for leftovers; what was made is removed.
            ProjectDatabaseError: Before any container started, the project
                database was unusable or stayed locked too long, or already
                holds this task id. (Once batches have run, a commit that
                fails ends the task as ERROR instead, keeping its outcome.)
        """
        started = time.monotonic()
        started_at = datetime.now(UTC)
        policy = self.policy_for(spec.project_id)
        pool_policy = policy
        if policy.cpu_time_s and not self.backend.usage_supported():
            raise ConfigurationError(
                "cpu_time_s: this host cannot measure a sandbox's CPU time (its cgroups are out of this "
                "process's sight), so the limit could not be enforced; unset cpu_time_s"
            )
        secrets = resolve_secrets(policy)
        task_id = spec.task_id or uuid.uuid4().hex
        check_protocol_dir(spec.protocol_dir)
        data_dir = check_data_dir(spec.data_dir, policy.uid, policy.gid)
        if spec.flags.run_on_new_data_only and self.db is None:
            raise ConfigurationError(
                "run_on_new_data_only needs a project database to know what was processed: pass db="
            )
        self._check_image(policy.image)
        self.backend.check_runtime(policy)
        self._reap_once()
        files = scan(data_dir)
        # The workspace holds the bundle, which every batch's container mounts.
        # The uid its own containers run as (one no other live task has) is
        # leased at its first cold batch and held until every task directory
        # is removed: a task served by warm slots holds only theirs.
        task: TaskRun | None = None
        try:
            with self._task_dir(policy.uid_range[0], policy.gid) as workspace:
                bundle = copy_bundle(spec.protocol_dir, workspace.protocol)
                task_hash = spec.task_hash or default_task_hash(bundle.sha256, spec.parameters)
                plan = plan_task(self._host, spec, task_hash, data_dir, files)
                task = TaskRun(
                    host=self._host,
                    spec=spec,
                    task_id=task_id,
                    task_hash=task_hash,
                    policy=policy,
                    secrets=secrets,
                    bundle=bundle,
                    data_dir=data_dir,
                    plan=plan,
                    workspace=workspace,
                    cancel=cancel,
                    on_progress=on_progress,
                    started_at=started_at,
                    pool=self.pool_for(pool_policy),
                )
                outcome = task.run()
        finally:
            if task is not None:
                task.release()
        outcome.timings["total"] = time.monotonic() - started
        return outcome


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
