"""The operator's command line: ``sandbox-executor run PROTOCOL_DIR --data DATA_DIR`` and friends.

``run`` records what ran in a project database (``--db``, by default one under
the executor's state directory); ``results``, ``failed-files`` and ``tasks``
read it back.

Exit status: 0 when the task ended OK, 1 when it ended otherwise, 2 when it
could not be run at all (bad input, no engine, no image), 130 when a second
Ctrl-C stopped the wait for a cancelled task. Errors are one line
on stderr; with ``--json`` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from executor import __version__, paths
from executor.errors import SandboxExecutorError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
# The shell's status for a process ended by SIGINT.
EXIT_INTERRUPTED = 130

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not _KEY_RE.fullmatch(key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a plain key, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _count(text: str) -> int:
    """A whole number from 0, for the counting options."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0, got {value}")
    return value


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=Path,
        default=None,
        metavar="FILE",
        help="project database (default: projects.sqlite under the executor's state directory)",
    )


def _db_path(args: argparse.Namespace) -> Path:

    return args.db if args.db is not None else paths.db_path()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="sandbox-executor", description="Run untrusted protocols, one hardened container per task."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one task in a sandbox")
    run.add_argument("protocol_dir", type=Path, metavar="PROTOCOL_DIR", help="directory with protocol.py")
    run.add_argument("--data", type=Path, required=True, metavar="DATA_DIR", help="datasource directory")
    run.add_argument("--project", default="default", metavar="NAME", help="project the task belongs to")
    run.add_argument("--task-id", default=None, metavar="ID", help="task identifier (default: random)")
    run.add_argument(
        "--param",
        action="append",
        type=_parse_param,
        default=[],
        metavar="KEY=VALUE",
        help="protocol parameter; VALUE is JSON if it parses, else a string",
    )
    run.add_argument("--policy", type=Path, metavar="FILE", help="isolation policy file (TOML)")
    _add_db(run)
    run.add_argument(
        "--task-hash",
        default="",
        metavar="H",
        help="name of the task's definition in the database (default: hash of the bundle and parameters)",
    )
    run.add_argument(
        "--new-data-only",
        action="store_true",
        help="show the task only files new or changed since this task hash last processed them",
    )
    run.add_argument(
        "--force-rerun-failed",
        action="store_true",
        help="with --new-data-only, also retry files that failed before",
    )
    run.add_argument(
        "--test-run", action="store_true", help="a trial on a few files; none is marked processed"
    )
    run.add_argument("--max-files", type=_count, default=0, metavar="N", help="show the task at most N files")
    run.add_argument(
        "--batch-size",
        type=_count,
        default=0,
        metavar="N",
        help="run in batches of N files, a container each",
    )
    run.add_argument("--max-batches", type=_count, default=0, metavar="N", help="run at most N batches")
    run.add_argument("--events", type=Path, metavar="FILE", help="append every event as a JSON line to FILE")
    run.add_argument("--json", action="store_true", help="print one JSON object with the outcome")
    policy = sub.add_parser("policy", help="check or show isolation policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path, metavar="FILE")
    show = policy_sub.add_parser("show", help="print a project's effective policy as JSON")
    show.add_argument("file", type=Path, metavar="FILE")
    show.add_argument("--project", default="default", metavar="NAME")
    show.add_argument(
        "--seccomp",
        action="store_true",
        help="print the seccomp profile the project's sandboxes get (the executor's default, "
        "or the policy's own within it) instead",
    )
    results = sub.add_parser("results", help="show the result rows tasks saved in the project database")
    _add_db(results)
    results.add_argument("--project", default="default", metavar="NAME")
    results.add_argument("--task-hash", default=None, metavar="H")
    results.add_argument("--json", action="store_true", help="print one JSON object")
    failed = sub.add_parser("failed-files", help="show the files that failed, with reasons and attempts")
    _add_db(failed)
    failed.add_argument("--project", default="default", metavar="NAME")
    failed.add_argument("--task-hash", default=None, metavar="H")
    failed.add_argument("--json", action="store_true", help="print one JSON object")
    tasks = sub.add_parser("tasks", help="show the task ledger: what ran, on what, and how it ended")
    _add_db(tasks)
    tasks.add_argument("--project", default=None, metavar="NAME")
    tasks.add_argument("--limit", type=_count, default=0, metavar="N", help="the newest N tasks only")
    tasks.add_argument("--json", action="store_true", help="print one JSON object")
    doctor = sub.add_parser(
        "doctor", help="check the engine, runtimes and images, and say how to fix what is missing"
    )
    doctor.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DATA_DIR",
        help="also say how this datasource's views would be made (hard links or bind mounts)",
    )
    reap = sub.add_parser("reap", help="remove containers and directories left by dead executors")
    reap.add_argument(
        "--all", action="store_true", help="remove every managed container, even of live executors"
    )
    reap.add_argument("--json", action="store_true", help="print what was removed as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "reap":
            return _reap(args)
        if args.command in ("results", "failed-files", "tasks"):
            return _records(args)
        if args.command == "policy":
            return _policy(args)
        if args.command == "doctor":
            from executor.cli.doctor import run_doctor

            return run_doctor(args.data)
    except SandboxExecutorError as exc:
        from executor.cli.terminal import printable

        # The message may quote file names from the protocol directory.
        print(f"sandbox-executor: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # The second Ctrl-C: the executor's cleanup ran as the interrupt
        # unwound it (container, socket and task directory are gone).
        print("sandbox-executor: interrupted; stopped waiting for the task", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from executor.data.stores import open_store
    from executor.mailbox.transport import NoModellerTransport
    from executor.runner import Executor
    from executor.spec import InferenceLimits, TaskFlags, TaskSpec

    spec = TaskSpec(
        protocol_dir=args.protocol_dir,
        data_dir=args.data,
        project_id=args.project,
        task_id=args.task_id,
        parameters=dict(args.param),
        datasource_name=args.data.name,
        task_hash=args.task_hash,
        batch_size=args.batch_size,
        flags=TaskFlags(
            test_run=args.test_run,
            run_on_new_data_only=args.new_data_only,
            force_rerun_failed_files=args.force_rerun_failed,
        ),
        inference_limits=InferenceLimits(max_files=args.max_files, max_batches=args.max_batches),
    )
    policies = None
    if args.policy is not None:
        from executor.policy.file import load_policy_file

        policies = load_policy_file(args.policy)
    db = open_store(_db_path(args))
    hooks: list[Any] = []
    events_file = None
    if args.events is not None:
        from executor.hooks import EventsFile

        events_file = EventsFile(args.events)
        hooks.append(events_file)
    cancel = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        if not args.json:
            print("cancelling (Ctrl-C again to stop waiting)…", file=sys.stderr)

    # No modeller is attached to a task run from here: what it sends is
    # discarded and counted, never stored, and its receives fail at once.
    transport = NoModellerTransport()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with contextlib.ExitStack() as stack:
            if not args.json:
                from executor.cli.display import ProgressDisplay

                hooks.append(stack.enter_context(ProgressDisplay()).on_event)
            # One task per process: a warm pool would only boot sandboxes nobody takes.
            executor = stack.enter_context(
                Executor(policies=policies, transport=transport, db=db, hooks=hooks, warm=False)
            )
            outcome = executor.run(spec, cancel=cancel)
    finally:
        transport.close()
        if events_file is not None:
            events_file.close()
        signal.signal(signal.SIGINT, previous)

    discarded = transport.discarded(outcome.task_id).messages
    if args.json:
        print(json.dumps({**outcome.to_dict(), "discarded_messages": discarded}))
    else:
        from executor.cli.display import print_outcome

        print_outcome(outcome)
        if discarded:
            print(
                f"note: no modeller is attached, so the {discarded} mailbox message(s) for it "
                "(the task's, and the parent's notices of batches and aborts) were discarded",
                file=sys.stderr,
            )
    return EXIT_OK if outcome.ok else EXIT_TASK_FAILED


def _records(args: argparse.Namespace) -> int:
    from executor.cli import records

    path = _db_path(args)
    if args.command == "results":
        return records.results_command(path, args.project, args.task_hash, args.json)
    if args.command == "failed-files":
        return records.failed_files_command(path, args.project, args.task_hash, args.json)
    return records.tasks_command(path, args.project, args.json, args.limit or None)


def _policy(args: argparse.Namespace) -> int:
    from executor.policy.file import load_policy_file

    policies = load_policy_file(args.file)
    if args.policy_command == "check":
        names = ", ".join(sorted(policies.projects)) or "none"
        print(f"{args.file}: OK ([default] and {len(policies.projects)} project(s): {names})")
        return EXIT_OK
    policy = policies.for_project(args.project)
    if args.seccomp:
        from executor.policy.seccomp import profile_json

        print(json.dumps(json.loads(profile_json(policy.seccomp_profile, policy.runtime)), indent=2))
        return EXIT_OK
    print(json.dumps(policy.describe(), indent=2))
    return EXIT_OK


def _reap(args: argparse.Namespace) -> int:
    from executor.runner import Executor

    report = Executor().reap(everything=args.all)
    if args.json:
        print(
            json.dumps(
                {"containers": report.containers, "task_dirs": report.task_dirs, "spools": report.spools}
            )
        )
    else:
        print(
            f"removed {len(report.containers)} container(s), {len(report.task_dirs)} task "
            f"director{'y' if len(report.task_dirs) == 1 else 'ies'}, {len(report.spools)} spool(s)"
        )
    return EXIT_OK
