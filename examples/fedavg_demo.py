"""Federated averaging across two pods, each task in its own sandbox: a runnable demo.

Two pods (``pod-a``, ``pod-b``) hold different, non-IID slices of synthetic data
(``examples/data/fedavg``) generated from ``y = 3*x1 - 2*x2 + 1 + noise``. Each runs
``examples/protocols/fedavg`` in a hardened container from the numpy image; this
process plays the modeller over an in-memory transport. Every round it sends the
global weights to both pods, waits for both local updates, and averages them
weighted by the pods' sample counts (FedAvg). Only weights, sample counts and losses
cross the mailbox, sealed with each task's own key, which the sandboxes never see.

Run it from the repository root after ``make images`` (which builds the numpy image)::

    .venv/bin/python examples/fedavg_demo.py [--rounds 20] [--json]

Exit status: 0 when both tasks end OK and the global weights are within
``--tolerance`` of [3, -2, 1]; 1 otherwise; 2 when the demo could not start (no
engine, image not built). Ctrl-C cancels both tasks; a second Ctrl-C stops waiting.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from traceback import format_exc
from typing import TYPE_CHECKING, Any

from executor.errors import SandboxExecutorError
from executor.mailbox.crypto import TaskKeys
from executor.outcome import ErrorDetail, Outcome, Status
from executor.policy import IsolationPolicy
from executor.runner import Executor
from executor.spec import TaskSpec
from executor.testing import InMemoryTransport, LocalModeller, ModellerMessage

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from executor.events import ProgressUpdate

EXAMPLES = Path(__file__).resolve().parent
PROTOCOL_DIR = EXAMPLES / "protocols" / "fedavg"
DATA_DIR = EXAMPLES / "data" / "fedavg"
PODS = {"pod-a": DATA_DIR / "pod_a", "pod-b": DATA_DIR / "pod_b"}
NUMPY_IMAGE = "sandbox-executor/numpy:latest"
TRUE_WEIGHTS = (3.0, -2.0, 1.0)
MODELLER_NAME = "fedavg-demo"
POLL_S = 0.2
# How long a pod that said it is aborting has to end by itself.
ABORT_GRACE_S = 10.0
MAX_TIMEOUT_S = 600  # the longest mailbox wait a sandbox may ask its parent for

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class DemoError(Exception):
    """The federation cannot go on: a pod ended, went quiet, or sent nonsense.

    ``ending`` is a pod that said it is aborting: it ends by itself, with its own
    status, so it is given a moment before it too is cancelled.
    """

    def __init__(self, message: str, ending: Pod | None = None) -> None:
        super().__init__(message)
        self.ending = ending


@dataclass
class Pod:
    """One pod's task as the modeller tracks it."""

    name: str
    task_id: str
    spec: TaskSpec
    cancel: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    thread: threading.Thread | None = None
    progress_events: int = 0

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds (default 20)")
    parser.add_argument("--local-epochs", type=int, default=2, help="local epochs per round (default 2)")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="local step size (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=32, help="local mini-batch size (default 32)")
    parser.add_argument(
        "--tolerance", type=float, default=0.1, help="largest error allowed in any final weight (default 0.1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds either side waits for the other's next message (default 120, at most 600)",
    )
    parser.add_argument(
        "--image", default=NUMPY_IMAGE, help=f"sandbox image with numpy (default {NUMPY_IMAGE})"
    )
    parser.add_argument(
        "--json", action="store_true", help="human output to stderr; stdout is one JSON summary object"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.local_epochs < 1 or args.batch_size < 1:
        parser.error("--rounds, --local-epochs and --batch-size must be at least 1")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        parser.error(f"--timeout must be more than 0 and at most {MAX_TIMEOUT_S} seconds")
    return args


def fmt(x: float) -> str:
    return f"{x:+.4f}" if abs(x) < 1e4 else f"{x:+.3e}"


def encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def decode_update(pod: Pod, message: ModellerMessage, expected_round: int) -> dict[str, Any]:
    """A pod's TRAINING_UPDATE, checked: the modeller trusts no pod's bytes either."""
    try:
        update = json.loads(message.read())
        weights = [float(w) for w in update["weights"]]
        num_samples = update["num_samples"]
        losses = (float(update["global_loss"]), float(update["local_loss"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise DemoError(f"{pod.name} sent a malformed training update ({exc})") from None
    if update.get("round") != expected_round:
        raise DemoError(f"{pod.name} sent the update of round {update.get('round')!r}, not {expected_round}")
    if len(weights) != len(TRUE_WEIGHTS) or not all(map(math.isfinite, [*weights, *losses])):
        raise DemoError(f"{pod.name} sent weights or losses that are not {len(TRUE_WEIGHTS)} finite numbers")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise DemoError(f"{pod.name} sent a sample count that is not a positive integer: {num_samples!r}")
    return {"weights": weights, "num_samples": num_samples, "global_loss": losses[0], "local_loss": losses[1]}


def abort_reason(message: ModellerMessage) -> str:
    """The reason in a pod's TASK_ABORT, shortened; the pod's text is only displayed."""
    try:
        body = json.loads(message.read())
        text = f"{body['message']} ({body['reason']})"
    except (ValueError, TypeError, KeyError):
        text = "(no readable reason)"
    return text[:500]


def fedavg(updates: list[dict[str, Any]]) -> tuple[list[float], float]:
    """Average the pods' weights by sample count; the same weighting gives the global loss."""
    total = sum(u["num_samples"] for u in updates)
    weights = [
        sum(u["weights"][i] * u["num_samples"] for u in updates) / total for i in range(len(TRUE_WEIGHTS))
    ]
    loss = sum(u["global_loss"] * u["num_samples"] for u in updates) / total
    return weights, loss


class Modeller:
    """The modeller's loop over the pods' tasks."""

    def __init__(
        self,
        modeller: LocalModeller,
        pods: list[Pod],
        timeout: float,
        stop: threading.Event,
        say: Callable[[str], None],
    ) -> None:
        self.modeller = modeller
        self.pods = pods
        self.timeout = timeout
        self.stop = stop
        self.say = say

    def expect(self, pod: Pod, message_type: str) -> ModellerMessage:
        """The pod's next message, which must be ``message_type``; fails fast if the task ended.

        A pod's messages arrive in the order it sent them, so anything else first
        is skipped with a note, except an abort.
        """
        deadline = time.monotonic() + self.timeout
        while True:
            if self.stop.is_set():
                raise DemoError("interrupted")
            message = self.modeller.receive(pod.task_id, POLL_S, pod.name)
            if message is not None:
                if message.type == message_type:
                    return message
                if message.type == "TASK_ABORT":
                    raise DemoError(f"{pod.name} aborted: {abort_reason(message)}", ending=pod)
                self.say(f"  (ignoring an unexpected {message.type} from {pod.name})")
                continue
            if not pod.running:
                # Its last messages may still be in flight; drain before giving up.
                message = self.modeller.receive(pod.task_id, POLL_S, pod.name)
                if message is not None and message.type == message_type:
                    return message
                if self.stop.is_set():
                    # Ctrl-C cancelled the task while we were polling.
                    raise DemoError("interrupted")
                status = pod.outcome.status.value if pod.outcome else "no outcome"
                raise DemoError(
                    f"{pod.name}'s task ended ({status}) while the modeller waited for {message_type}"
                )
            if time.monotonic() >= deadline:
                raise DemoError(f"no {message_type} from {pod.name} within {self.timeout:g} s")

    def run(self, rounds: int) -> list[float]:
        """Start, train for ``rounds`` rounds, finish; return the final global weights."""
        for pod in self.pods:
            self.expect(pod, "TASK_START")
            self.modeller.ready(pod.task_id, pod.name)
            self.say(f"{pod.name}: task {pod.task_id} started; modeller ready")
        weights = [0.0] * len(TRUE_WEIGHTS)
        self.say("round  loss of the weights sent   new global weights (w1, w2, b)")
        for r in range(1, rounds + 1):
            for pod in self.pods:
                self.modeller.send(
                    pod.task_id, "ALGORITHM_EXCHANGE", encode({"round": r, "weights": weights}), pod.name
                )
            updates = [decode_update(pod, self.expect(pod, "TRAINING_UPDATE"), r) for pod in self.pods]
            weights, loss = fedavg(updates)
            shown = ", ".join(fmt(w) for w in weights)
            self.say(f"{r:5d}  {fmt(loss)[1:]:>24}   [{shown}]")
        for pod in self.pods:
            self.modeller.send(pod.task_id, "TRAINING_COMPLETE", encode({"weights": weights}), pod.name)
        return weights


def make_pods(args: argparse.Namespace, modeller: LocalModeller) -> list[Pod]:
    run_id = uuid.uuid4().hex[:8]
    pods = []
    for name, data_dir in PODS.items():
        task_id = f"fedavg-{name}-{run_id}"
        keys = TaskKeys.generate()
        modeller.add_task(task_id, keys, name)
        spec = TaskSpec(
            protocol_dir=PROTOCOL_DIR,
            data_dir=data_dir,
            project_id="fedavg-demo",
            task_id=task_id,
            modeller_name=MODELLER_NAME,
            pod_identifier=name,
            pod_identifiers=tuple(PODS),
            datasource_name=data_dir.name,
            parameters={
                "rounds": args.rounds,
                "local_epochs": args.local_epochs,
                "learning_rate": args.learning_rate,
                "batch_size": args.batch_size,
                "timeout": args.timeout,
            },
            keys=keys,
        )
        pods.append(Pod(name, task_id, spec))
    return pods


def start(pod: Pod, executor: Executor) -> None:
    """Run the pod's task in a thread of its own; its outcome lands on ``pod``."""

    def count(update: ProgressUpdate) -> None:
        pod.progress_events += 1

    def work() -> None:
        try:
            pod.outcome = executor.run(pod.spec, on_progress=count, cancel=pod.cancel)
        except Exception as exc:  # it could not start, or the executor failed: report it as an outcome
            pod.outcome = Outcome(
                pod.task_id, Status.ERROR, error=ErrorDetail(type(exc).__name__, str(exc), format_exc())
            )

    # A daemon, so that a second Ctrl-C can stop waiting for a task that will not end.
    pod.thread = threading.Thread(target=work, name=f"task-{pod.name}", daemon=True)
    pod.thread.start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    policy = IsolationPolicy.hardened().replace(image=args.image)
    transport = InMemoryTransport()
    modeller = LocalModeller(transport)
    pods: list[Pod] = []
    stop = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        for pod in pods:
            pod.cancel.set()
        say("cancelling both tasks (Ctrl-C again to stop waiting)...")

    previous = signal.signal(signal.SIGINT, on_sigint)
    started = time.monotonic()
    weights: list[float] | None = None
    problem = ""
    try:
        executors = [Executor(policy=policy, transport=transport) for _ in PODS]
        try:
            executors[0].backend.check_image(policy.image)
        except SandboxExecutorError as exc:
            print(f"fedavg_demo: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        pods.extend(make_pods(args, modeller))
        for pod, executor in zip(pods, executors, strict=True):
            if not stop.is_set():
                start(pod, executor)
        try:
            weights = Modeller(modeller, pods, args.timeout, stop, say).run(args.rounds)
        except DemoError as exc:
            problem = str(exc)
            say(f"federation stopped: {problem}")
            for pod in pods:
                if pod is not exc.ending:
                    pod.cancel.set()
            if exc.ending is not None:
                exc.ending.join(ABORT_GRACE_S)
                exc.ending.cancel.set()
        for pod in pods:
            while pod.running:
                pod.join(POLL_S)
    except KeyboardInterrupt:
        say("stopped waiting; a sandbox may still be shutting down")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGINT, previous)
        for pod in pods:
            pod.cancel.set()
        modeller.close()
        transport.close()
    return report(args, pods, weights, problem, time.monotonic() - started, say)


def report(
    args: argparse.Namespace,
    pods: list[Pod],
    weights: list[float] | None,
    problem: str,
    elapsed: float,
    say: Callable[[str], None],
) -> int:
    """Print both outcomes and the verdict; return the exit status."""
    say("")
    for pod in pods:
        outcome = pod.outcome
        if outcome is None:
            say(f"{pod.name}: no outcome")
            continue
        total = outcome.timings.get("total", 0.0)
        say(f"{pod.name}: {outcome.status.value} in {total:.1f} s ({pod.progress_events} progress events)")
        if outcome.ok:
            say(f"  result: {json.dumps(outcome.result)}")
        elif outcome.error is not None:
            say(f"  error: {outcome.error.type}: {outcome.error.message}")
            if outcome.error.traceback:
                say("  " + outcome.error.traceback.strip().replace("\n", "\n  "))
            if outcome.error.stderr_tail:
                say("  stderr: " + outcome.error.stderr_tail.strip().replace("\n", "\n          "))

    all_ok = len(pods) == len(PODS) and all(p.outcome is not None and p.outcome.ok for p in pods)
    error: float | None = None
    if weights is not None:
        error = max(abs(w - t) for w, t in zip(weights, TRUE_WEIGHTS, strict=True))
        shown = ", ".join(fmt(w) for w in weights)
        say(f"final global weights [{shown}] vs [3, -2, 1]: largest error {fmt(error)[1:]}")
    if all_ok:
        results = [p.outcome.result for p in pods if p.outcome is not None]
        n = sum(r["num_samples"] for r in results)
        before = sum(r["loss_before"] * r["num_samples"] for r in results) / n
        after = sum(r["loss_after"] * r["num_samples"] for r in results) / n
        say(f"global loss {fmt(before)[1:]} -> {fmt(after)[1:]} over {n} samples; {elapsed:.1f} s in all")
    ok = all_ok and not problem and error is not None and error <= args.tolerance
    say("OK: both pods trained and the weights converged" if ok else "FAILED")
    if args.json:
        summary = {
            "ok": ok,
            "rounds": args.rounds,
            "weights": weights,
            "max_error": error,
            "tolerance": args.tolerance,
            "problem": problem,
            "elapsed": round(elapsed, 3),
            "outcomes": {p.name: p.outcome.to_dict() if p.outcome else None for p in pods},
        }
        print(json.dumps(summary))
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    status = main()
    # Every task has ended and been cleaned up by now. Exit without the interpreter's
    # shutdown, which would wait on the parent's gRPC worker threads: after a cancel,
    # one may sit in the cancelled task's mailbox receive until that receive's own
    # timeout (an executor bug), delaying the exit by up to --timeout seconds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
