"""Opening a project store from a path or a URL, and an executor recording through whichever it opened."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from executor.data.memory import MemoryStore
from executor.data.sqlite import ProjectDatabase
from executor.data.stores import STORES, open_store
from executor.errors import ConfigurationError
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.runner import Executor
from executor.spec import TaskFlags, TaskSpec
from executor.testing import FakeBackend, host_runtime
from tests.storecases import HASH, PROJECT, URLS, start

if TYPE_CHECKING:
    from collections.abc import Callable


def test_every_registered_store_is_held_to_the_contract() -> None:
    assert set(URLS) == set(STORES)


def test_a_path_or_a_sqlite_url_opens_sqlite_and_memory_a_fresh_store(tmp_path: Path) -> None:
    by_path = open_store(tmp_path / "a.db")
    assert isinstance(by_path, ProjectDatabase)
    assert by_path.path == tmp_path / "a.db"
    assert isinstance(open_store(str(tmp_path / "b.db")), ProjectDatabase)
    by_url = open_store(f"sqlite://{tmp_path}/c%20d.db")
    assert isinstance(by_url, ProjectDatabase)
    assert by_url.path == tmp_path / "c d.db"
    one, two = open_store("memory:"), open_store("memory:")
    assert isinstance(one, MemoryStore)
    assert one is not two
    one.start_task(start("t1"))
    assert two.tasks() == []


def test_an_unknown_or_malformed_store_url_is_a_one_line_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_store("postgresql://db.example/pods")
    assert str(info.value) == (
        "unknown project store 'postgresql://db.example/pods': its scheme 'postgresql' is not one of"
        " memory:, sqlite: (or give a plain path for SQLite)"
    )
    with pytest.raises(ConfigurationError, match=r"sqlite:///path/to/file\.db"):
        open_store("sqlite://remote.example/pod.db")
    assert not (tmp_path / "pod.db").exists()


# -- the executor sees only the contract -------------------------------------------------------

# Per file of its view: "bad..." is reported failed; any other gets a result row and is processed.
PER_FILE = """
def run(ctx):
    names = sorted(p.relative_to(ctx.data_dir).as_posix() for p in ctx.data_dir.rglob("*") if p.is_file())
    for name in names:
        if (ctx.data_dir / name).read_text().startswith("bad"):
            ctx.file_failed(name, "malformed")
            continue
        ctx.save_results([{"file": name}])
        ctx.file_processed(name)
    return {"files": names}
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(URLS))
def test_an_executor_given_a_store_url_records_its_batched_task_there_and_resumes_from_it(
    kind: str, tmp_path: Path, make_protocol: Callable[..., Path]
) -> None:
    # Made to fail by running the second task without new_data_only (it then
    # sees a.csv and b.csv again), or by a store that loses a committed batch.
    data = tmp_path / "data"
    data.mkdir()
    for name, text in {"a.csv": "1", "b.csv": "2", "c.csv": "bad"}.items():
        (data / name).write_text(text)
        (data / name).chmod(0o644)
    data.chmod(0o755)
    policy = IsolationPolicy.hardened().replace(
        heartbeat_interval_s=0.05, heartbeat_timeout_s=10, timeout_s=60, uid_start=30001, uid_count=1
    )
    run_dir = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))  # short: a socket path must fit
    try:
        with Executor(
            FakeBackend(host_runtime(tmp_path / "scratch")),
            policy=policy,
            run_dir=run_dir,
            spool_dir=tmp_path / "spool",
            uid_dir=tmp_path / "uids",
            db=URLS[kind](tmp_path),
            warm=False,
        ) as ex:
            spec = TaskSpec(
                protocol_dir=make_protocol(PER_FILE),
                data_dir=data,
                project_id=PROJECT,
                task_id="t-first",
                task_hash=HASH,
                batch_size=2,
            )
            outcome = ex.run(spec)
            assert outcome.status is Status.OK, outcome.error
            (data / "d.csv").write_text("4")
            (data / "d.csv").chmod(0o644)
            again = ex.run(
                TaskSpec(
                    protocol_dir=spec.protocol_dir,
                    data_dir=data,
                    project_id=PROJECT,
                    task_id="t-again",
                    task_hash=HASH,
                    flags=TaskFlags(run_on_new_data_only=True),
                )
            )
            assert again.status is Status.OK, again.error
            # a.csv and b.csv were processed, c.csv failed unchanged: only the new file is seen.
            assert again.result == {"files": ["d.csv"]}
            store = ex.db
            assert store is not None
            assert [(r.task_id, r.batch, r.row["file"]) for r in store.results(PROJECT)] == [
                ("t-first", 1, "a.csv"),
                ("t-first", 1, "b.csv"),
                ("t-again", 1, "d.csv"),
            ]
            assert [(t.task_id, t.status, t.batches_done) for t in store.tasks(PROJECT)] == [
                ("t-again", "OK", 1),
                ("t-first", "OK", 2),
            ]
            assert store.file_states(PROJECT, HASH).failed == {"c.csv": ("malformed", 1)}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
