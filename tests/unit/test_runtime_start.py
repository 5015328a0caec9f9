"""The real runtime on the host against a real task server: no protocol code before a seen beat."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from executor.events import ControlKind
from executor.rpc.server import TaskServer
from executor.rpc.session import TaskSession
from executor.v1 import sandbox_pb2 as pb

from .conftest import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[2]
RUNTIME = (
    "import sys; from pathlib import Path; import executor.sandbox.runtime as r; "
    "r.SCRATCH_DIR = Path(sys.argv[1]); sys.exit(r.main(sys.argv[2:]))"
)


def _config(task_id: str, bundle: Path) -> pb.TaskConfig:
    """The task config both tests run the runtime with."""
    return pb.TaskConfig(
        task_id=task_id,
        protocol_path=str(bundle),
        entry_module="protocol",
        heartbeat_interval_ms=50,
        max_result_bytes=1024,
        max_message_bytes=1024,
        chunk_bytes=1024,
        parameters_json="{}",
        schema_json="{}",
    )


@contextlib.contextmanager
def _runtime(session: TaskSession, scratch: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The real runtime in a subprocess against a task server for ``session``.

    The process, the server and the socket directory are cleaned up on every
    path, including a server start or a Popen that fails.
    """
    sock_dir = Path(tempfile.mkdtemp(prefix="se-unit-", dir="/tmp"))
    server = None
    proc = None
    try:
        token = secrets.token_urlsafe(32)
        (sock_dir / "token").write_text(token)
        server = TaskServer(session, token, sock_dir / "sandbox.sock")
        server.start()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                RUNTIME,
                str(scratch),
                "--socket",
                str(sock_dir / "sandbox.sock"),
                "--token-file",
                str(sock_dir / "token"),
            ],
            cwd=REPO,
        )
        yield proc
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        if server is not None:
            server.stop(grace=0.2)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_the_protocol_is_not_even_imported_before_the_parent_has_seen_a_beat(
    make_session, make_protocol, tmp_path, monkeypatch
):
    marker = tmp_path / "imported"
    bundle = make_protocol(f"open({str(marker)!r}, 'w').close()\n\n\ndef run(ctx):\n    return 'ran'\n")
    session = make_session(config=_config("t", bundle)).session
    # A parent that records beats but has not acknowledged one yet.
    record_beat = TaskSession.record_beat
    acknowledge = [False]

    def record_without_ack(self: TaskSession, *args: object) -> None:
        record_beat(self, *args)  # type: ignore[arg-type]
        if not acknowledge[0]:
            while not self.controls.empty():
                self.controls.get_nowait()

    monkeypatch.setattr(TaskSession, "record_beat", record_without_ack)
    with _runtime(session, tmp_path / "scratch") as proc:
        assert wait_for(lambda: session.beat_stats.beats >= 3 or marker.exists(), 30), (
            "the runtime never beat"
        )
        assert not marker.exists(), "protocol code ran before the parent had seen a beat"
        acknowledge[0] = True
        session.send_control(ControlKind.BEAT_SEEN)
        assert proc.wait(30) == 0
        assert marker.exists()
        assert session.finish is not None
        assert session.finish.result == "ran"


def test_a_modeller_ready_before_the_sandbox_boots_reaches_the_protocol(
    make_session, make_protocol, tmp_path
):
    # The protocol looks without waiting: the ready signal must already be on its context.
    bundle = make_protocol("def run(ctx):\n    return ctx.mailbox.modeller_ready.is_set()\n")
    kit = make_session(config=_config("task-1", bundle))
    session = kit.session
    kit.broker.watch_ready(lambda: session.send_control(ControlKind.MODELLER_READY))
    kit.modeller.ready(kit.task_id)
    # The control is queued before the runtime exists, so it comes down the
    # heartbeat stream before the protocol's context is made.
    assert wait_for(lambda: not session.controls.empty(), 10), "the modeller's TASK_START was not seen"
    with _runtime(session, tmp_path / "scratch") as proc:
        assert proc.wait(30) == 0
        assert session.finish is not None
        assert session.finish.result is True, "the MODELLER_READY that came before the context was dropped"
