"""Start permits: at most ``limit`` sandboxes starting at once on the host, the rest in line, in order.

Two gates on one directory stand for two executor processes of one host; a
child process that holds a permit and is killed shows a permit ends with its
holder. No Docker.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from executor.errors import CapacityError
from executor.task.admission import MAX_STARTING, StartGate, default_max_starting

from .conftest import wait_for

pytestmark = pytest.mark.timeout(60)


def _waiter(gate: StartGate, got: list[object], **kwargs: object) -> threading.Thread:
    thread = threading.Thread(target=lambda: got.append(gate.acquire(**kwargs)), daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_the_default_is_two_per_cpu_and_at_least_two():
    assert 2 <= default_max_starting() <= MAX_STARTING


@pytest.mark.parametrize("limit", [0, -1, MAX_STARTING + 1, 1.5, True])
def test_a_limit_out_of_range_is_refused(tmp_path, limit):
    with pytest.raises(ValueError, match="max_starting"):
        StartGate(limit, tmp_path)


def test_no_more_than_the_limit_start_at_once_and_a_release_admits_the_next(tmp_path):
    gate = StartGate(2, tmp_path / "starting")
    first, second = gate.acquire(), gate.acquire()
    got: list[object] = []
    thread = _waiter(gate, got)
    assert wait_for(lambda: gate.waiting == 1)
    time.sleep(0.2)
    assert got == [], "a third sandbox was admitted while two were starting"
    first.release()
    thread.join(5)
    assert len(got) == 1
    assert got[0] is not None
    assert gate.starting == 2
    second.release()
    got[0].release()  # type: ignore[attr-defined]
    assert gate.starting == 0


def test_waiters_are_admitted_in_the_order_they_came(tmp_path):
    gate = StartGate(1, tmp_path)
    held = gate.acquire()
    order: list[int] = []
    threads = []
    for i in range(5):

        def wait(i: int = i) -> None:
            permit = gate.acquire()
            order.append(i)
            time.sleep(0.01)
            permit.release()  # type: ignore[union-attr]

        threads.append(threading.Thread(target=wait, daemon=True))
        threads[-1].start()
        assert wait_for(lambda i=i: gate.waiting == i + 1)
    held.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_two_gates_on_one_directory_share_one_host_budget(tmp_path):
    # Two executor processes of one host: the permits are the same files.
    a, b = StartGate(2, tmp_path), StartGate(2, tmp_path)
    held = [a.acquire(), b.acquire()]
    got: list[object] = []
    thread = _waiter(b, got)
    time.sleep(0.3)
    assert got == [], "the second gate admitted a third sandbox on the host"
    held[0].release()  # a permit of the other gate: not notified, found by polling
    thread.join(5)
    assert len(got) == 1
    assert got[0] is not None
    for p in (held[1], got[0]):
        p.release()  # type: ignore[attr-defined]


HOLD_PERMIT = """
import sys, time
from pathlib import Path
from executor.task.admission import StartGate
permit = StartGate(1, Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_permit_ends_with_the_process_that_held_it(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_PERMIT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        gate = StartGate(1, tmp_path)
        got: list[object] = []
        thread = _waiter(gate, got)
        time.sleep(0.3)
        assert got == []
        proc.kill()
        thread.join(5)
        assert len(got) == 1
        assert got[0] is not None
        got[0].release()  # type: ignore[attr-defined]
    finally:
        proc.kill()
        proc.communicate()  # reaps it and closes its pipes


def test_a_full_line_refuses_a_task_at_once_with_a_capacity_error(tmp_path):
    gate = StartGate(1, tmp_path, max_queued=1)
    held = gate.acquire()
    got: list[object] = []
    thread = _waiter(gate, got)
    assert wait_for(lambda: gate.waiting == 1)
    with pytest.raises(CapacityError, match="start queue is full") as info:
        gate.acquire()
    assert "\n" not in str(info.value)
    assert gate.stats()["refused"] == 1
    held.release()
    thread.join(5)
    got[0].release()  # type: ignore[attr-defined]


def test_a_line_of_none_still_admits_a_task_when_a_permit_is_free(tmp_path):
    gate = StartGate(1, tmp_path, max_queued=0)
    permit = gate.acquire()
    assert permit is not None
    with pytest.raises(CapacityError):
        gate.acquire()
    permit.release()


def test_a_cancelled_waiter_leaves_the_line_and_gets_nothing(tmp_path):
    gate = StartGate(1, tmp_path)
    held = gate.acquire()
    cancel = threading.Event()
    got: list[object] = []
    thread = _waiter(gate, got, cancel=cancel)
    assert wait_for(lambda: gate.waiting == 1)
    cancel.set()
    thread.join(5)
    assert got == [None]
    assert gate.waiting == 0
    held.release()
    assert gate.starting == 0


def test_what_the_poll_finds_while_waiting_is_taken_instead_of_a_permit(tmp_path):
    gate = StartGate(1, tmp_path)
    held = gate.acquire()
    slot: list[str] = []
    got: list[object] = []
    thread = _waiter(gate, got, poll=lambda: slot[0] if slot else None)
    assert wait_for(lambda: gate.waiting == 1)
    slot.append("a warm slot")
    gate.notify()
    thread.join(5)
    assert got == ["a warm slot"]
    assert gate.waiting == 0
    held.release()


def test_background_work_takes_a_free_permit_only_when_no_task_waits(tmp_path):
    gate = StartGate(2, tmp_path)
    refill = gate.try_acquire()
    assert refill is not None  # nobody waits: a warm pool's refill may boot a slot
    other_process = StartGate(2, tmp_path).acquire()
    got: list[object] = []
    thread = _waiter(gate, got)
    assert wait_for(lambda: gate.waiting == 1)
    # A permit comes free elsewhere on the host; the task in line polls for it.
    # The refill asks at once, ahead of that poll, and is told no.
    other_process.release()  # type: ignore[union-attr]
    assert gate.try_acquire() is None
    thread.join(5)
    assert len(got) == 1
    assert got[0] is not None
    refill.release()
    got[0].release()  # type: ignore[attr-defined]


def test_a_release_twice_gives_back_one_permit(tmp_path):
    gate = StartGate(1, tmp_path)
    permit = gate.acquire()
    assert permit is not None
    assert permit.held
    permit.release()
    permit.release()
    assert not permit.held
    assert gate.starting == 0
    again = gate.acquire()
    assert again is not None
    again.release()


def test_a_permit_directory_in_a_file_is_a_host_error_naming_it(tmp_path):
    from executor.errors import HostError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HostError) as info:
        StartGate(1, blocker / "starting").acquire()
    assert info.value.path == str(blocker / "starting")


def test_every_permit_file_is_private_to_the_owner(tmp_path):
    gate = StartGate(1, tmp_path / "starting")
    permit = gate.acquire()
    assert permit is not None
    assert (tmp_path / "starting").stat().st_mode & 0o077 == 0
    assert all(p.stat().st_mode & 0o077 == 0 for p in Path(tmp_path / "starting").iterdir())
    permit.release()
