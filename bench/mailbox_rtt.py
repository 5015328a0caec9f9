"""Mailbox round trip through a real sandbox, against a multiprocessing.Queue ping-pong.

The protocol (bench/protocols/ping) announces itself with TASK_START, then
loops: receive MODELLER_RESPONSE, send TRAINING_UPDATE. The modeller side, in
this process over an in-memory transport, sends then receives and times each
round trip with ``perf_counter``. One round trip is therefore: seal (modeller),
transport, open (parent), gRPC stream down, gRPC stream up, seal (parent),
transport, open (modeller).

Two baselines, measured in the same run with the same payload and count:

- a ``multiprocessing.Queue`` ping-pong with a spawned child: put, the child
  gets and puts the same bytes back, get. That is the seed's proxy mailbox
  transport without a container, gRPC or encryption;
- a bare grpcio bidi-stream ping-pong over a Unix socket: a server in a spawned
  child echoes each message of one stream (generic handler, raw bytes, no
  protobuf, default options); this process writes one message and reads the
  echo before writing the next. That is what a round trip over gRPC costs
  without a container, encryption, a second call or a modeller transport.

    .venv/bin/python bench/mailbox_rtt.py [--rounds 500] [--size 1024] [--runtimes runc,runsc] [--json]

The parent admits at most 1000 calls/s per task after a burst of 2000 (see
executor/rpc/limits.py); a round trip is two calls, so long runs of fast round
trips are throttled. The protocol retries throttled calls and the count is
reported.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import time
from typing import TYPE_CHECKING, Any

import _common as c

if TYPE_CHECKING:
    from collections.abc import Iterator


def _echo(inbox: Any, outbox: Any, rounds: int) -> None:
    for _ in range(rounds):
        outbox.put(inbox.get())


def queue_baseline(ws: c.Workspace, rounds: int, warmup: int, size: int) -> dict[str, Any]:
    """Round trips of ``size`` bytes through two multiprocessing.Queues and a spawned child."""
    mp = multiprocessing.get_context("spawn")
    inbox, outbox = mp.Queue(), mp.Queue()
    child = ws.track_process(mp.Process(target=_echo, args=(inbox, outbox, warmup + rounds), daemon=True))
    child.start()
    payload = b"\x5a" * size
    samples = []
    for i in range(warmup + rounds):
        t = time.perf_counter()
        inbox.put(payload)
        reply = outbox.get(timeout=60)
        dt = time.perf_counter() - t
        if len(reply) != size:
            raise RuntimeError("the queue child echoed the wrong payload")
        if i >= warmup:
            samples.append(dt)
    child.join(30)
    inbox.close()
    outbox.close()
    return {"rtt": c.summary(samples)}


GRPC_METHOD = "/bench.Echo/Ping"


def _grpc_echo_server(address: str, conn: Any) -> None:
    """Serve one echo bidi-stream method on ``address`` until ``conn`` says stop (or closes)."""
    from concurrent import futures

    import grpc

    def echo(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        yield from requests

    service, method = GRPC_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.stream_stream_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    server.add_insecure_port(address)
    server.start()
    conn.send("ready")
    with contextlib.suppress(EOFError):
        conn.recv()
    server.stop(None)


def grpc_baseline(ws: c.Workspace, rounds: int, warmup: int, size: int) -> dict[str, Any]:
    """Round trips of ``size`` bytes over one grpcio bidi stream to a spawned child, on a Unix socket."""
    import grpc

    mp = multiprocessing.get_context("spawn")
    address = f"unix:{ws.root / 'grpc-echo.sock'}"
    conn, child_conn = mp.Pipe()
    child = ws.track_process(mp.Process(target=_grpc_echo_server, args=(address, child_conn), daemon=True))
    child.start()
    child_conn.close()
    if not conn.poll(60) or conn.recv() != "ready":
        raise RuntimeError("the grpc echo server did not start")
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def writes() -> Iterator[bytes]:
        while (item := outbox.get()) is not None:
            yield item

    payload = b"\x5a" * size
    samples = []
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        replies = channel.stream_stream(GRPC_METHOD)(writes())
        for i in range(warmup + rounds):
            t = time.perf_counter()
            outbox.put(payload)
            reply = next(replies)
            dt = time.perf_counter() - t
            if len(reply) != size:
                raise RuntimeError("the grpc echo server echoed the wrong payload")
            if i >= warmup:
                samples.append(dt)
        outbox.put(None)
        for _ in replies:
            pass
    finally:
        outbox.put(None)
        channel.close()
        with contextlib.suppress(OSError):
            conn.send("stop")
        child.join(30)
        conn.close()
    return {"rtt": c.summary(samples), "grpcio": grpc.__version__}


def sandbox_rtt(ws: c.Workspace, runtime: str, rounds: int, warmup: int, size: int) -> dict[str, Any]:
    """Round trips of ``size`` bytes through a sandbox on ``runtime``."""
    from executor.mailbox.crypto import TaskKeys
    from executor.spec import TaskSpec

    transport = ws.transport()
    modeller = ws.modeller(transport)
    executor = ws.executor(c.policy(runtime), transport=transport)
    task_id = c.new_task_id(f"rtt-{runtime}")
    keys = TaskKeys.generate()
    modeller.add_task(task_id, keys)
    spec = TaskSpec(
        protocol_dir=c.PROTOCOLS / "ping",
        data_dir=ws.data_dir(),
        task_id=task_id,
        keys=keys,
        parameters={"rounds": warmup + rounds, "size": size},
    )
    handle = ws.start(executor, spec)
    hello = modeller.receive(task_id, timeout=120)
    if hello is None or hello.type != "TASK_START":
        handle.wait(60)
        c.check_ok(handle.outcome, f"mailbox on {runtime}")
        raise RuntimeError(f"expected TASK_START from the sandbox, got {hello}")
    payload = b"\x5a" * size
    samples = []
    started = time.perf_counter()
    for i in range(warmup + rounds):
        t = time.perf_counter()
        modeller.send(task_id, "MODELLER_RESPONSE", payload)
        reply = modeller.receive(task_id, timeout=60)
        dt = time.perf_counter() - t
        if reply is None or reply.type != "TRAINING_UPDATE" or len(reply.read()) != size:
            handle.stop()
            raise RuntimeError(f"round {i}: expected a {size}-byte TRAINING_UPDATE, got {reply}")
        if i >= warmup:
            samples.append(dt)
    elapsed = time.perf_counter() - started
    outcome = handle.wait(120)
    c.check_ok(outcome, f"mailbox on {runtime}")
    return {
        "rtt": c.summary(samples),
        "round_trips_per_s": (warmup + rounds) / elapsed,
        "throttled_calls": outcome.result["throttled"],
    }


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    base = res["baseline_queue"]["rtt"]
    grpc_base = res["baseline_grpc"]["rtt"]
    rows = [
        ["mp.Queue (baseline)", c.ms(base["p50"]), c.ms(base["p99"]), "1.00x", "-", "-", "-", "-"],
        [
            "grpc bidi, Unix socket (baseline)",
            c.ms(grpc_base["p50"]),
            c.ms(grpc_base["p99"]),
            c.times(report["ratios"]["grpc_vs_queue"]["p50"]),
            "1.00x",
            "1.00x",
            "-",
            "-",
        ],
    ]
    for rt in report["params"]["runtimes"]:
        r = res.get(rt)
        if r is None:
            continue
        q = report["ratios"][rt]
        rows.append(
            [
                f"sandbox {rt}",
                c.ms(r["rtt"]["p50"]),
                c.ms(r["rtt"]["p99"]),
                c.times(q["p50"]),
                c.times(q["p50_vs_grpc"]),
                c.times(q["p99_vs_grpc"]),
                c.num(r["round_trips_per_s"], 0),
                str(r["throttled_calls"]),
            ]
        )
    p = report["params"]
    return c.table(
        f"mailbox round trip, {p['rounds']} rounds of {p['size']} bytes each way (ms)",
        ["", "p50", "p99", "p50/queue", "p50/grpc", "p99/grpc", "rt/s", "throttled"],
        rows,
    )


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=500, help="measured round trips")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured round trips first")
    parser.add_argument("--size", type=int, default=1024, help="payload bytes each way")
    parser.add_argument("--runtimes", type=c.runtimes_arg, default="runc,runsc", help="OCI runtimes")
    args = parser.parse_args()

    with c.Workspace() as ws:
        known = c.available_runtimes(ws)
        notes = [
            "all three time send-then-receive with perf_counter in this process; "
            "the sandbox path seals and opens each body twice (AES-GCM), the queue path pickles, "
            "the grpc path sends raw bytes on one open stream",
        ]
        results: dict[str, Any] = {
            "baseline_queue": queue_baseline(ws, args.rounds, args.warmup, args.size),
            "baseline_grpc": grpc_baseline(ws, args.rounds, args.warmup, args.size),
        }
        base = results["baseline_queue"]["rtt"]
        grpc_base = results["baseline_grpc"]["rtt"]
        ratios: dict[str, Any] = {"grpc_vs_queue": {"p50": c.ratio(grpc_base["p50"], base["p50"])}}
        for rt in args.runtimes:
            if rt not in known:
                notes.append(f"{rt} skipped: the engine knows only {', '.join(known)}")
                continue
            r = results[rt] = sandbox_rtt(ws, rt, args.rounds, args.warmup, args.size)
            ratios[rt] = {
                "p50": c.ratio(r["rtt"]["p50"], base["p50"]),
                "p99": c.ratio(r["rtt"]["p99"], base["p99"]),
                "p50_vs_grpc": c.ratio(r["rtt"]["p50"], grpc_base["p50"]),
                "p99_vs_grpc": c.ratio(r["rtt"]["p99"], grpc_base["p99"]),
            }
            if r["throttled_calls"]:
                notes.append(
                    f"{rt}: {r['throttled_calls']} call(s) were throttled by the per-task rate limit "
                    "(1000 calls/s, burst 2000) and retried after 5 ms; those round trips include the wait"
                )
        report = {
            "benchmark": "mailbox_rtt",
            "machine": c.machine(ws),
            "params": {k: v for k, v in vars(args).items() if k != "json"},
            "results": results,
            "ratios": ratios,
            "notes": notes,
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
