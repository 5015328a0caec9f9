"""Bulk transfer: a large training update up and a large model down, against a multiprocessing.Pipe.

Each side runs in a fresh child interpreter of its own, as
tests/integration/test_mailbox.py does, so that the child's ``ru_maxrss`` is
this measurement's alone: peak parent RSS growth is ``ru_maxrss`` after the
transfers minus before them (after a 1 MiB warm-up task). Each row is the
median of ``--repeats`` transfers.

Sandbox path (bench/protocols/bulk_timed, timestamps from the same host clock):

- up, pod side: the protocol calls ``send_training_update`` until it returns:
  raw bytes over the task's bulk socket into the parent, sealed (AES-GCM, 1 MiB
  segments) into the spool, handed to the transport;
- up, end to end: to the modeller holding the opened plaintext (plus its
  decryption into its own spool);
- down, pod side: from the modeller's sealed file reaching the transport to
  the protocol holding the bytes (the parent opens it one authenticated
  segment at a time, straight down the bulk socket into the sandbox);
- down, end to end: including the modeller sealing it.

Baseline, same run, same bytes, same 1 MiB chunks: a spawned child sends the
update to the parent through a ``multiprocessing.Pipe`` (the parent discards
it) and the parent sends the model back (the child assembles it in a
bytearray). The pipe carries no encryption and touches no disk.

    .venv/bin/python bench/bulk_transfer.py [--mib 256] [--repeats 3] [--runtimes runc,runsc]
        [--no-verify] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import _common as c


def _blocks() -> list[bytes]:
    """Four distinct 1 MiB blocks; the model sent down repeats them."""
    return [hashlib.sha256(str(i).encode()).digest() * (c.MiB // 32) for i in range(4)]


# -- baseline: a multiprocessing.Pipe ----------------------------------------------
def _pipe_child(conn: Any, mib: int, repeats: int) -> None:
    size = mib * c.MiB
    update = os.urandom(size)
    view = memoryview(update)
    conn.send_bytes(b"ready")
    for _ in range(repeats):
        conn.recv_bytes()
        send_start = time.time()
        for start in range(0, size, c.MiB):
            conn.send_bytes(view[start : start + c.MiB])
        # A fresh buffer each time, as the sandbox's receive makes one.
        model = bytearray(size)
        filled = 0
        while filled < size:
            filled += conn.recv_bytes_into(model, filled)
        received = time.time()
        conn.send((send_start, received, filled))


def pipe_parent(mib: int, repeats: int) -> dict[str, Any]:
    """Role ``pipe``: the baseline transfer, ``repeats`` times, in this (fresh) interpreter."""
    mp = multiprocessing.get_context("spawn")
    blocks = _blocks()
    size = mib * c.MiB
    conn, child_conn = mp.Pipe()
    child = mp.Process(target=_pipe_child, args=(child_conn, mib, repeats), daemon=True)
    child.start()
    up, down = [], []
    try:
        conn.recv_bytes()
        before = c.peak_rss_mib()
        for _ in range(repeats):
            conn.send_bytes(b"go")
            got = 0
            while got < size:
                got += len(conn.recv_bytes())
            up_done = time.time()
            down_start = time.time()
            for i in range(mib):
                conn.send_bytes(blocks[i % 4])
            send_start, received, filled = conn.recv()
            if got != size or filled != size:
                raise RuntimeError(f"pipe moved {got} up and {filled} down, expected {size}")
            up.append(up_done - send_start)
            down.append(received - down_start)
        after = c.peak_rss_mib()
        child.join(30)
    finally:
        if child.is_alive():
            child.kill()
    return {
        "up_s": c.median(up),
        "down_s": c.median(down),
        "samples": {"up_s": up, "down_s": down},
        "rss_before_mib": before,
        "rss_after_mib": after,
    }


# -- the executor ----------------------------------------------------------------
def _transfer(ws: c.Workspace, executor: Any, modeller: Any, mib: int, verify: bool) -> dict[str, Any]:
    from executor.mailbox.crypto import TaskKeys
    from executor.spec import TaskSpec

    task_id = c.new_task_id("bulk")
    keys = TaskKeys.generate()
    modeller.add_task(task_id, keys)
    spec = TaskSpec(
        protocol_dir=c.PROTOCOLS / "bulk_timed",
        data_dir=ws.data_dir(),
        task_id=task_id,
        keys=keys,
        parameters={"mib": mib, "verify": verify},
    )
    handle = ws.start(executor, spec)
    update = modeller.receive(task_id, timeout=900)
    up_done = time.time()
    if update is None:
        c.check_ok(handle.wait(60), "bulk transfer")
        raise RuntimeError("no training update arrived")
    up_digest = hashlib.sha256()
    if verify:
        if update.path is not None:
            with update.path.open("rb") as f:
                while chunk := f.read(c.MiB):
                    up_digest.update(chunk)
        else:
            up_digest.update(update.read())
    if update.path is not None:
        update.path.unlink(missing_ok=True)
    blocks = _blocks()
    down_digest = hashlib.sha256()
    if verify:
        for i in range(mib):
            down_digest.update(blocks[i % 4])
    down_start = time.time()
    modeller.send_stream(task_id, "ALGORITHM_EXCHANGE", (blocks[i % 4] for i in range(mib)))
    down_sealed = time.time()
    outcome = handle.wait(900)
    c.check_ok(outcome, "bulk transfer")
    r = outcome.result
    if r["received_size"] != mib * c.MiB:
        raise RuntimeError(f"the sandbox received {r['received_size']} bytes, not {mib * c.MiB}")
    if verify and (
        r["sent_sha256"] != up_digest.hexdigest() or r["received_sha256"] != down_digest.hexdigest()
    ):
        raise RuntimeError("bulk transfer: a digest does not match")
    return {
        "up_pod_s": r["send_end"] - r["send_start"],
        "up_total_s": up_done - r["send_start"],
        "down_seal_s": down_sealed - down_start,
        "down_pod_s": r["received"] - down_sealed,
        "down_total_s": r["received"] - down_start,
    }


def sandbox_parent(root: Path, runtime: str, mib: int, repeats: int, verify: bool) -> dict[str, Any]:
    """Role ``sandbox``: warm up with 1 MiB, then move ``mib`` each way ``repeats`` times."""
    with c.Workspace(root=root) as ws:
        transport = ws.transport()
        modeller = ws.modeller(transport)
        policy = c.policy(
            runtime,
            memory_mb=max(1024, 3 * mib + 512),
            max_message_mb=max(512, mib + 1),
            max_task_mb=max(4096, 2 * mib + 64),
        )
        executor = ws.executor(policy, transport=transport)
        (root / f"instance-{runtime}").write_text(executor.instance_id)
        _transfer(ws, executor, modeller, 1, verify)
        before = c.peak_rss_mib()
        runs = [_transfer(ws, executor, modeller, mib, verify) for _ in range(repeats)]
        after = c.peak_rss_mib()
        keys = [k for k in runs[0] if k.endswith("_s")]
        result: dict[str, Any] = {k: c.median(r[k] for r in runs) for k in keys}
        result.update(
            samples={k: [r[k] for r in runs] for k in keys},
            verified=verify,
            rss_before_mib=before,
            rss_after_mib=after,
        )
        return result


def _child(ws: c.Workspace, argv: list[str]) -> dict[str, Any]:
    return ws.run_script(__file__, argv, timeout=1800)


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    mib = report["params"]["mib"]
    base = res["baseline_pipe"]
    rows = [
        [
            "mp.Pipe (baseline)",
            c.num(mib / base["up_s"], 0),
            "-",
            c.num(mib / base["down_s"], 0),
            "-",
            c.num(base["rss_after_mib"] - base["rss_before_mib"], 1),
        ]
    ]
    ratio_rows = []
    for rt in report["params"]["runtimes"]:
        r = res.get(rt)
        if r is None:
            continue
        rows.append(
            [
                f"sandbox {rt}",
                c.num(mib / r["up_pod_s"], 0),
                c.num(mib / r["up_total_s"], 0),
                c.num(mib / r["down_pod_s"], 0),
                c.num(mib / r["down_total_s"], 0),
                c.num(r["rss_after_mib"] - r["rss_before_mib"], 1),
            ]
        )
        q = report["ratios"][rt]
        ratio_rows.append(
            [
                rt,
                c.times(q["up_pod"]),
                c.times(q["up_total"]),
                c.times(q["down_pod"]),
                c.times(q["down_total"]),
            ]
        )
    return "\n".join(
        [
            c.table(
                f"{mib} MiB each way, median of {report['params']['repeats']} (MiB/s; RSS growth in MiB)",
                ["", "up pod", "up e2e", "down pod", "down e2e", "parent peak RSS +"],
                rows,
            ),
            "",
            c.table(
                "throughput ratio, pipe / sandbox (how many times slower)",
                ["runtime", "up pod", "up e2e", "down pod", "down e2e"],
                ratio_rows,
            ),
        ]
    )


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--mib", type=int, default=256, help="MiB each way")
    parser.add_argument("--repeats", type=int, default=3, help="transfers per row; medians are reported")
    parser.add_argument("--runtimes", type=c.runtimes_arg, default="runc,runsc", help="OCI runtimes")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 checks (outside timing)")
    parser.add_argument("--role", choices=["sandbox", "pipe"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "pipe":
        print(json.dumps(pipe_parent(args.mib, args.repeats)))
        return
    if args.role == "sandbox":
        result = sandbox_parent(args.root, args.runtimes[0], args.mib, args.repeats, not args.no_verify)
        print(json.dumps(result))
        return

    with c.Workspace() as ws:
        known = c.available_runtimes(ws)
        notes = [
            "the pipe baseline carries no encryption and no spooling: the sandbox path seals or opens "
            "every byte (AES-256-GCM) and stages it on disk once per hop",
            "pod = what the pod's parent adds; e2e adds the in-process modeller's own crypto",
            "parent peak RSS + = ru_maxrss growth of a fresh parent interpreter across the transfer",
        ]
        sizes = ["--mib", str(args.mib), "--repeats", str(args.repeats)]
        results: dict[str, Any] = {"baseline_pipe": _child(ws, ["--role", "pipe", *sizes])}
        ratios: dict[str, Any] = {}
        base = results["baseline_pipe"]
        for rt in args.runtimes:
            if rt not in known:
                notes.append(f"{rt} skipped: the engine knows only {', '.join(known)}")
                continue
            ws.adopt_instance_file(ws.root / f"instance-{rt}")
            argv = ["--role", "sandbox", "--root", str(ws.root), "--runtimes", rt, *sizes]
            r = results[rt] = _child(ws, argv + (["--no-verify"] if args.no_verify else []))
            ratios[rt] = {
                "up_pod": c.ratio(r["up_pod_s"], base["up_s"]),
                "up_total": c.ratio(r["up_total_s"], base["up_s"]),
                "down_pod": c.ratio(r["down_pod_s"], base["down_s"]),
                "down_total": c.ratio(r["down_total_s"], base["down_s"]),
            }
        report = {
            "benchmark": "bulk_transfer",
            "machine": c.machine(ws),
            "params": {
                "mib": args.mib,
                "repeats": args.repeats,
                "runtimes": args.runtimes,
                "verify": not args.no_verify,
            },
            "results": results,
            "ratios": ratios,
            "notes": notes,
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
