"""The operator's command line: ``sandbox-executor run PROTOCOL_DIR --data DATA_DIR``.

Exit status: 0 when the task ended OK, 1 when it ended otherwise, 2 when it
could not be run at all (bad input, no engine, no image), 130 when a second
Ctrl-C stopped the wait for a cancelled task. Errors are one line
on stderr; with ``--json`` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from executor import __version__
from executor.errors import SandboxExecutorError

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
    run.add_argument("--json", action="store_true", help="print one JSON object with the outcome")
    policy = sub.add_parser("policy", help="check or show isolation policy files")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path, metavar="FILE")
    show = policy_sub.add_parser("show", help="print a project's effective policy as JSON")
    show.add_argument("file", type=Path, metavar="FILE")
    show.add_argument("--project", default="default", metavar="NAME")
    sub.add_parser("doctor", help="check the engine, runtimes and images, and say how to fix what is missing")
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
        if args.command == "policy":
            return _policy(args)
        if args.command == "doctor":
            from executor.cli.doctor import run_doctor

            return run_doctor()
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
    from executor.mailbox.transport import NoModellerTransport
    from executor.runner import Executor
    from executor.spec import TaskSpec

    spec = TaskSpec(
        protocol_dir=args.protocol_dir,
        data_dir=args.data,
        project_id=args.project,
        task_id=args.task_id,
        parameters=dict(args.param),
        datasource_name=args.data.name,
    )
    policies = None
    if args.policy is not None:
        from executor.policy_file import load_policy_file

        policies = load_policy_file(args.policy)
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
        with Executor(policies=policies, transport=transport) as executor:
            if args.json:
                outcome = executor.run(spec, cancel=cancel)
            else:
                from executor.cli.display import ProgressDisplay

                with ProgressDisplay() as display:
                    outcome = executor.run(spec, on_progress=display.update, cancel=cancel)
    finally:
        transport.close()
        signal.signal(signal.SIGINT, previous)

    discarded = transport.discarded(outcome.task_id).messages
    if args.json:
        print(json.dumps({**outcome.to_dict(), "discarded_messages": discarded}))
    else:
        from executor.cli.display import print_outcome

        print_outcome(outcome)
        if discarded:
            print(
                f"note: no modeller is attached, so the {discarded} mailbox message(s) the task sent "
                "were discarded",
                file=sys.stderr,
            )
    return EXIT_OK if outcome.ok else EXIT_TASK_FAILED


def _policy(args: argparse.Namespace) -> int:
    from executor.policy_file import load_policy_file

    policies = load_policy_file(args.file)
    if args.policy_command == "check":
        names = ", ".join(sorted(policies.projects)) or "none"
        print(f"{args.file}: OK ([default] and {len(policies.projects)} project(s): {names})")
        return EXIT_OK
    print(json.dumps(policies.for_project(args.project).describe(), indent=2))
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
