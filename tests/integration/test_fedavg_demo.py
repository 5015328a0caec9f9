"""The federated-averaging demo end to end: two pods, two sandboxes from the numpy image."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from executor.backends import LABEL_TASK

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "fedavg_demo.py"
NUMPY_IMAGE = "sandbox-executor/numpy:latest"
TRUE_WEIGHTS = (3.0, -2.0, 1.0)
TOLERANCE = 0.1


@pytest.fixture(scope="module")
def numpy_image(docker_client):
    import docker

    try:
        docker_client.images.get(NUMPY_IMAGE)
        built = True
    except docker.errors.ImageNotFound:
        built = False
    if not built:  # a failure, not a skip: the demo is part of what `make test` checks
        pytest.fail(f"{NUMPY_IMAGE} is not built: run `make images` (make test does)")
    return NUMPY_IMAGE


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), "--json", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_two_pods_average_their_way_to_the_true_weights(numpy_image, docker_client):
    proc = _demo("--rounds", "10", "--tolerance", str(TOLERANCE))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)

    assert summary["ok"] is True
    outcomes = summary["outcomes"]
    assert set(outcomes) == {"pod-a", "pod-b"}
    for pod, outcome in outcomes.items():
        assert outcome["status"] == "OK", (pod, outcome.get("error"))
    a, b = outcomes["pod-a"]["result"], outcomes["pod-b"]["result"]
    assert (a["pod"], a["num_samples"], b["pod"], b["num_samples"]) == ("pod-a", 300, "pod-b", 420)
    assert a["rounds"] == b["rounds"] == 10
    # Both pods ended holding the modeller's final global model, which fits both.
    assert a["final_weights"] == b["final_weights"] == summary["weights"]
    for got, want in zip(summary["weights"], TRUE_WEIGHTS, strict=True):
        assert abs(got - want) <= TOLERANCE, summary["weights"]
    for result in (a, b):
        assert result["loss_after"] < 0.1 < 10 < result["loss_before"]
    # Nothing of either task is left on the engine.
    for outcome in outcomes.values():
        label = f"{LABEL_TASK}={outcome['task_id']}"
        left = docker_client.containers.list(all=True, filters={"label": label})
        assert not left, [c.name for c in left]


def test_the_demo_fails_when_the_weights_are_not_close_enough(numpy_image):
    proc = _demo("--rounds", "1", "--tolerance", "0.001")
    assert proc.returncode == 1, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False
    assert {o["status"] for o in summary["outcomes"].values()} == {"OK"}
    assert summary["max_error"] > 0.001


def test_a_pod_that_gives_up_aborts_and_the_other_is_cancelled(numpy_image, docker_client):
    # Far too large a step: the local models diverge and the pods say so.
    proc = _demo("--rounds", "50", "--learning-rate", "0.9")
    assert proc.returncode == 1, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] is False
    assert "aborted: training diverged" in summary["problem"]
    statuses = sorted(o["status"] for o in summary["outcomes"].values())
    assert statuses in (["ABORT", "CANCELLED"], ["ABORT", "ABORT"]), summary["outcomes"]
    aborted = [o for o in summary["outcomes"].values() if o["status"] == "ABORT"]
    assert all(o["error"]["type"] == "Diverged" for o in aborted)


def test_ctrl_c_cancels_both_tasks(numpy_image, docker_client):
    proc = subprocess.Popen(
        [sys.executable, str(DEMO), "--json", "--rounds", "100000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until training is under way
            if line.split()[:1] == ["1"]:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr[-4000:]
    summary = json.loads(stdout)
    assert summary["problem"] == "interrupted"
    assert {pod: o["status"] for pod, o in summary["outcomes"].items()} == {
        "pod-a": "CANCELLED",
        "pod-b": "CANCELLED",
    }
    for outcome in summary["outcomes"].values():
        label = f"{LABEL_TASK}={outcome['task_id']}"
        assert not docker_client.containers.list(all=True, filters={"label": label})


def test_a_missing_image_says_how_to_build_it():
    proc = _demo("--rounds", "1", "--image", "sandbox-executor/no-such-image:latest")
    assert proc.returncode == 2
    assert "make images" in proc.stderr
    assert proc.stdout == ""
