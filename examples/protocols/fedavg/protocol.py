"""Example protocol: one pod's side of federated averaging for a linear regression, with numpy.

The pod fits ``y ~ w1*x1 + w2*x2 + b`` on its CSV files (columns ``x1,x2,y``). Each
round it receives the global weights from the modeller, runs a few local epochs of
mini-batch gradient descent on the mean squared error, and sends back only
aggregates: its local weights, its sample count and two losses. The rows never
leave the pod. Needs an image with numpy (``sandbox-executor/numpy:latest``).

Messages (JSON bodies, weights as ``[w1, w2, b]``):

- ALGORITHM_EXCHANGE, modeller to pod: ``{"round": r, "weights": [...]}``
- TRAINING_UPDATE, pod to modeller: ``{"round": r, "weights": [...],
  "num_samples": n, "global_loss": L(received weights), "local_loss": L(local weights)}``
- TRAINING_COMPLETE, modeller to pod: ``{"weights": [...]}``, the final global model

Parameters: ``rounds`` (required), ``local_epochs`` (2), ``learning_rate`` (0.05),
``batch_size`` (32), ``timeout`` (seconds to wait for the modeller, at most 600; 120),
``seed`` (0). Once the modeller is involved, a pod that gives up tells it why
(TASK_ABORT) before ending with status ABORT.
"""

import csv
import json
import math

import numpy as np

COLUMNS = ("x1", "x2", "y")
N_WEIGHTS = 3  # w1, w2 and the intercept
MAX_TIMEOUT_S = 600  # the longest mailbox wait the parent accepts


def give_up(ctx, message, reason):
    """Tell the modeller why this pod stops, then end the task with status ABORT."""
    ctx.mailbox.send_task_abort(message, reason=reason)
    ctx.abort(message, reason=reason)


def load_samples(ctx):
    """The pod's rows as a design matrix ``[x1, x2, 1]`` and targets ``y``."""
    files = sorted(p for p in ctx.data_dir.iterdir() if p.suffix == ".csv" and p.is_file())
    if not files:
        ctx.abort(f"no CSV files in datasource {ctx.datasource_name!r}", reason="NoData")
    rows = []
    for path in files:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                ctx.abort(f"{path.name} lacks column(s) {', '.join(missing)}", reason="BadSchema")
            for line, row in enumerate(reader, start=2):
                try:
                    rows.append([float(row[c]) for c in COLUMNS])
                except (TypeError, ValueError):
                    ctx.abort(f"{path.name}, line {line}: expected numbers in {COLUMNS}", reason="BadData")
    if not rows:
        ctx.abort("the datasource has no rows", reason="NoData")
    data = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(data).all():
        ctx.abort("the datasource holds non-finite values", reason="BadData")
    design = np.column_stack([data[:, :2], np.ones(len(data))])
    return design, data[:, 2]


def mse(design, y, weights):
    """Mean squared error of ``weights`` on the rows."""
    residual = design @ weights - y
    return float(residual @ residual) / len(y)


def decode_weights(ctx, body, what):
    """The weights in a modeller's JSON body, checked."""
    try:
        message = json.loads(body)
        weights = np.asarray(message["weights"], dtype=np.float64)
    except (ValueError, TypeError, KeyError):
        give_up(ctx, f"the modeller's {what} is not the expected JSON", "BadMessage")
    if weights.shape != (N_WEIGHTS,) or not np.isfinite(weights).all():
        give_up(ctx, f"the modeller's {what} does not hold {N_WEIGHTS} finite weights", "BadMessage")
    return message, weights


def run(ctx):
    p = ctx.parameters
    try:
        rounds = int(p["rounds"])
        local_epochs = int(p.get("local_epochs", 2))
        learning_rate = float(p.get("learning_rate", 0.05))
        batch_size = int(p.get("batch_size", 32))
        timeout = float(p.get("timeout", 120))
        seed = int(p.get("seed", 0))
    except (KeyError, TypeError, ValueError) as exc:
        ctx.abort(f"bad or missing parameter: {exc}", reason="BadParameters")
    if min(rounds, local_epochs, batch_size) < 1 or not (
        0 < learning_rate < 1 and 0 < timeout <= MAX_TIMEOUT_S
    ):
        ctx.abort(
            "expected rounds, local_epochs and batch_size >= 1, 0 < learning_rate < 1 "
            f"and 0 < timeout <= {MAX_TIMEOUT_S}",
            reason="BadParameters",
        )

    design, y = load_samples(ctx)
    n = len(y)
    batches = math.ceil(n / batch_size)
    max_epochs = rounds * local_epochs
    rng = np.random.default_rng(seed)

    ctx.progress.run_start()
    ctx.mailbox.send_task_start()
    if not ctx.mailbox.wait_for_modeller(timeout):
        give_up(ctx, f"the modeller was not ready within {timeout:g} s", "ModellerTimeout")

    loss_before = None
    for r in range(1, rounds + 1):
        message, weights = decode_weights(
            ctx, ctx.mailbox.await_algorithm_exchange(timeout), "global weights"
        )
        if message.get("round") != r:
            give_up(
                ctx, f"expected the weights of round {r}, got round {message.get('round')!r}", "BadMessage"
            )
        global_loss = mse(design, y, weights)
        if loss_before is None:
            loss_before = global_loss
        for e in range(1, local_epochs + 1):
            epoch = (r - 1) * local_epochs + e
            ctx.progress.epoch_start(epoch, max_epochs)
            order = rng.permutation(n)
            for b in range(batches):
                idx = order[b * batch_size : (b + 1) * batch_size]
                xb, yb = design[idx], y[idx]
                gradient = 2.0 / len(idx) * (xb.T @ (xb @ weights - yb))
                weights = weights - learning_rate * gradient
                ctx.progress.step(b + 1, batches, info=f"round {r}", epoch=epoch, max_epochs=max_epochs)
            ctx.progress.epoch_end(epoch, max_epochs)
        local_loss = mse(design, y, weights)
        if not (np.isfinite(weights).all() and math.isfinite(global_loss) and math.isfinite(local_loss)):
            give_up(ctx, f"training diverged in round {r}; lower the learning rate", "Diverged")
        update = {
            "round": r,
            "weights": weights.tolist(),
            "num_samples": n,
            "global_loss": global_loss,
            "local_loss": local_loss,
        }
        ctx.mailbox.send_training_update(json.dumps(update).encode())

    _, final = decode_weights(ctx, ctx.mailbox.await_training_complete(timeout), "final weights")
    ctx.progress.run_end()
    return {
        "pod": ctx.pod_identifier,
        "num_samples": n,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "loss_before": round(loss_before, 6),
        "loss_after": round(mse(design, y, final), 6),
        "final_weights": final.tolist(),
        "last_local_weights": weights.tolist(),
    }
