"""Test protocol: every mailbox operation of the seed's proxy, in order."""

from executor.sandbox.context import MailboxError, MailboxTimeout


def run(ctx):
    mb = ctx.mailbox
    seen = {"ready_at_start": mb.modeller_ready.is_set()}
    mb.send_task_start()
    seen["ready"] = mb.wait_for_modeller(30)
    mb.send_preparing_data_batches()
    mb.send_number_of_batches(3)
    mb.send_current_batch_id(1)
    mb.send_batches_complete("complete")
    mb.send_training_update(b"\x00\x01weights")
    seen["algorithm_exchange"] = mb.await_algorithm_exchange(10).decode()
    seen["training_complete"] = mb.await_training_complete(10).decode()
    seen["task_complete"] = mb.await_task_complete(10).decode()
    seen["modeller_response"] = mb.await_modeller_response(10).decode()
    try:
        mb.await_modeller_response(0.3)
    except MailboxTimeout as exc:
        seen["timeout"] = [type(exc).__name__, isinstance(exc, TimeoutError), exc.code]
    try:
        mb.receive("TRAINING_UPDATE", 1)
    except MailboxError as exc:
        seen["receive_forbidden"] = exc.code
    try:
        mb.send("ALGORITHM_EXCHANGE", b"pretending to be the modeller")
    except MailboxError as exc:
        seen["send_forbidden"] = exc.code
    mb.send_task_abort("stopping early", reason="LimitsExceeded", exception_type="ValueError", traceback="tb")
    return seen
