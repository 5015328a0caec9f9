"""Bench protocol: report progress as fast as it can for a while, or sleep as long (the baseline).

``mode`` is ``steps`` (``ctx.progress.step`` in a tight loop, an honest but
eager protocol), ``raw`` (a Report of progress itself in a tight loop,
past whatever ``ctx.progress`` does: what a hostile protocol can make the
parent do) or ``sleep`` (nothing for as long). Every ``per_epoch`` steps
(0: never) an epoch starts and ends, as a training loop's would. A call the
parent throttles is retried after a short pause.
"""

import time


def _raw(ctx):
    from executor.sandbox.context import RPC_TIMEOUT_S
    from executor.v1 import sandbox_pb2 as pb

    client = ctx.progress._client

    def report(**fields):
        client.call(
            lambda: client.stub.Report(
                pb.ReportRequest(progress=pb.ProgressEvent(**fields)),
                metadata=client.metadata,
                timeout=RPC_TIMEOUT_S,
            )
        )

    return report


def run(ctx):
    seconds = float(ctx.parameters["seconds"])
    mode = ctx.parameters["mode"]
    per_epoch = int(ctx.parameters.get("per_epoch", 500))
    started = time.monotonic()
    if mode == "sleep":
        time.sleep(seconds)
        return {
            "calls": 0,
            "seconds": time.monotonic() - started,
            "coalescing": hasattr(ctx.progress, "flush"),
        }
    raw = _raw(ctx) if mode == "raw" else None
    calls = epoch = 0
    ctx.progress.run_start()
    while time.monotonic() - started < seconds:
        if per_epoch and calls % per_epoch == 0:
            if epoch:
                ctx.progress.epoch_end(epoch, 10**6)
            epoch += 1
            ctx.progress.epoch_start(epoch, 10**6)
        if raw is not None:
            raw(kind="STEP", current=calls, total=10**9, info="loss 0.125", current_epoch=epoch)
        else:
            ctx.progress.step(calls, 10**9, "loss 0.125", epoch=epoch)
        calls += 1
    if epoch:
        ctx.progress.epoch_end(epoch, 10**6)
    ctx.progress.run_end()
    return {
        "calls": calls,
        "seconds": time.monotonic() - started,
        "epochs": epoch,
        # Whether this sandbox's ctx.progress coalesces steps (a runtime from
        # issue 17 on); an older image sends every one.
        "coalescing": hasattr(ctx.progress, "flush"),
    }
