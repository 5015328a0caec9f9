"""The sandbox sees only the files the parent selected, and can change none of them.

A data view shares inodes with the operator's data (hard links) or mounts
each file (bind mounts), so these run real containers of both runtimes over
both ways of making a view, and judge by what the protocol could see and do,
and by the operator's files afterwards.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.spec import InferenceLimits, TaskSpec

from ..conftest import PROTOCOLS

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.security

FILES = {
    "a.csv": "id,value\n1,2\n",
    "c:d.csv": "id,value\n3,4\n",
    "sub/b.csv": "id,value\n5,6\n",
    "zz-secret.csv": "not for this task\n",
}
SELECTED = ["a.csv", "c:d.csv", "sub/b.csv"]


def _datasource(root: Path) -> Path:
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        path.write_text(text)
        path.chmod(0o644)
    root.chmod(0o755)
    return root


def _stamps(root: Path) -> dict[str, tuple[str, int, int, int]]:
    out = {}
    for name in FILES:
        st = (root / name).stat()
        out[name] = ((root / name).read_text(), st.st_mode, st.st_mtime_ns, st.st_nlink)
    return out


@pytest.mark.parametrize("method", ["hardlink", "bind", "warm"])
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_the_sandbox_reads_only_its_selection_and_changes_nothing(
    runtime, method, tmp_path, make_executor, docker_client
):
    """``warm``: a hard-link view made in a warm pool's slot, after its sandbox booted."""
    data = _datasource(tmp_path / "data")
    before = _stamps(data)
    warm = method == "warm"
    executor = make_executor(
        policy=IsolationPolicy.hardened().replace(runtime=runtime, warm_pool=int(warm)),
        view_method="hardlink" if warm else method,
    )
    if warm:
        assert executor.warm_up(wait=60), executor.pool_stats()
    outcome = executor.run(
        TaskSpec(
            protocol_dir=PROTOCOLS / "view_probe",
            data_dir=data,
            inference_limits=InferenceLimits(max_files=3),
            parameters={"report_outside": ["zz-secret.csv"]},
        )
    )
    assert outcome.status is Status.OK, outcome.error
    assert outcome.warm_starts == int(warm)
    seen = outcome.result
    assert seen["files"] == {name: FILES[name] for name in SELECTED}
    assert seen["refused"] == {"zz-secret.csv": "INVALID_ARGUMENT"}
    assert set(outcome.files) == set(SELECTED)
    assert outcome.selection == {
        "total": 4,
        "selected": 3,
        "skipped_processed": 0,
        "skipped_failed": 0,
        "over_limit": 1,
        "skipped_unusable": 0,
    }
    expected_mounts = [["/data", True]]
    if method == "bind":
        expected_mounts += [[f"/data/{name}", True] for name in SELECTED]
    if runtime == "runc":
        assert seen["mounts"] == sorted(expected_mounts)
    refused = {what: how for what, how in seen["attempts"].items() if how == "allowed"}
    assert not refused, f"the sandbox could change its view: {seen['attempts']}"
    if runtime == "runc":
        # Opening for writing meets the file's mode first (root's file, 0644);
        # everything else meets the read-only mount, whoever owns the inode.
        assert seen["attempts"] == {
            "write": "EACCES",
            "truncate": "EACCES",
            "chmod": "EROFS",
            "utime": "EROFS",
            "unlink": "EROFS",
            "rename": "EROFS",
            "link": "EROFS",
            "create": "EROFS",
        }
    # The operator's files: same bytes, mode, times, and no link left behind.
    assert _stamps(data) == before
    assert all(nlink == 1 for *_, nlink in before.values())
    assert sorted(os.listdir(data)) == ["a.csv", "c:d.csv", "sub", "zz-secret.csv"]
