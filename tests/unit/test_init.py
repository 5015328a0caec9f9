"""The sandbox's init on the host (not pid 1): the output cap and the lifeline to the parent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from executor.sandbox.init import EXIT_INIT_FAILED, EXIT_PARENT_GONE, forward
from executor.task.lifeline import Lifeline

from .conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
CAP = 64 * 1024
TAIL = 4 * 1024


def _forwarded(payload: bytes) -> bytes:
    """What ``forward`` passes on of ``payload`` written to its pipe."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    out: list[bytes] = []

    def collect() -> None:
        with os.fdopen(dst_r, "rb") as f:
            out.append(f.read())

    collector = threading.Thread(target=collect)
    collector.start()
    forwarder = threading.Thread(target=forward, args=(src_r, dst_w, "stdout", CAP, TAIL))
    forwarder.start()
    with os.fdopen(src_w, "wb") as f:
        f.write(payload)
    forwarder.join(10)
    os.close(dst_w)
    collector.join(10)
    return out[0]


@pytest.mark.parametrize("lines", [10, 4096, 4097])
def test_output_is_capped_with_its_start_and_its_end_kept(lines):
    # 4096 lines of 64 bytes end exactly on read boundaries past the cap.
    payload = b"".join(f"{i:063d}\n".encode() for i in range(lines))
    out = _forwarded(payload)
    if len(payload) <= CAP:
        assert out == payload
        return
    assert out.startswith(payload[:CAP])
    assert out.endswith(f"{lines - 1:063d}\n".encode())
    assert out.count(b"[sandbox init: stdout reached its cap") == 1
    assert len(out) <= CAP + TAIL + 512


def test_a_flood_is_read_to_the_end_and_costs_only_the_cap():
    out = _forwarded(b"y" * (64 * 1024 * 1024))
    assert len(out) <= CAP + TAIL + 512


CHILD = textwrap.dedent(
    """
    import os, sys, time
    print(os.getpid(), flush=True)
    sys.stderr.close()
    os.close(2)
    time.sleep(600)
    """
)


def _init(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "executor.sandbox.init", *args, "--", sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_init_ends_the_sandbox_when_the_parent_lets_go_of_the_lifeline(tmp_path):
    lifeline = Lifeline(tmp_path / "lifeline.sock")
    lifeline.start()
    proc = _init("--lifeline", str(lifeline.path))
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert wait_for(lambda: lifeline.connected)
        # One connection only: the listener is gone once init holds it.
        assert wait_for(lambda: not lifeline.path.exists())
        assert proc.poll() is None
        lifeline.close()
        assert proc.wait(10) == EXIT_PARENT_GONE
        assert wait_for(lambda: _gone(child)), "the runtime outlived the lifeline"
        assert proc.stderr is not None
        assert "lost the parent" in proc.stderr.read()
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes its pipes
        lifeline.close()


def test_init_refuses_to_start_without_its_lifeline(tmp_path):
    proc = _init("--lifeline", str(tmp_path / "nobody-listens.sock"))
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == EXIT_INIT_FAILED
    assert out == ""  # the command never ran
    assert "lifeline" in err


def test_the_parent_lifeline_accepts_one_connection_only(tmp_path):
    lifeline = Lifeline(tmp_path / "lifeline.sock")
    lifeline.start()
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        first.connect(str(lifeline.path))
        assert wait_for(lambda: lifeline.connected and not lifeline.path.exists())
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(FileNotFoundError):  # its socket is gone once the one connection came
            second.connect(str(lifeline.path))
        second.close()
        first.settimeout(5)
        lifeline.close()
        assert first.recv(1) == b""
    finally:
        first.close()
        lifeline.close()


def test_a_lifeline_never_connected_leaves_nothing_behind(tmp_path):
    lifeline = Lifeline(tmp_path / "lifeline.sock")
    lifeline.start()
    lifeline.close()
    assert not lifeline.path.exists()


def _run_init(*command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "executor.sandbox.init", "--", *command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


@pytest.mark.parametrize("code", [0, 3, 75])
def test_init_exits_with_the_runtimes_status_and_passes_its_output_on(code):
    proc = _run_init(
        sys.executable, "-c", f"import sys; print('out'); print('err', file=sys.stderr); sys.exit({code})"
    )
    assert proc.returncode == code
    assert (proc.stdout, proc.stderr) == ("out\n", "err\n")


def test_a_runtime_killed_by_a_signal_is_reported_as_a_shell_would():
    proc = _run_init(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == 128 + 9


def test_init_forwards_a_termination_signal_to_the_runtime():
    child = "import signal, sys, time\nprint('ready', flush=True)\ntime.sleep(30)\n"
    proc = subprocess.Popen(
        [sys.executable, "-m", "executor.sandbox.init", "--", sys.executable, "-c", child],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(15)
        # The runtime died of the forwarded SIGTERM; init itself survived to report it.
        assert proc.wait(10) == 128 + 15
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes its pipes


@pytest.mark.parametrize("command", [(), ("/nonexistent/python3",)], ids=["none", "missing"])
def test_init_fails_closed_without_a_runnable_command(command):
    assert _run_init(*command).returncode == EXIT_INIT_FAILED
