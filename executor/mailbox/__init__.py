"""The parent's half of a task's mailbox: the broker, the transport seam and the crypto.

- :mod:`~executor.mailbox.broker`: seals, opens, meters and spools what a task sends and receives.
- :mod:`~executor.mailbox.transport`: :class:`~executor.mailbox.transport.Transport`, the pod's
  message service as the executor sees it, and :class:`~executor.mailbox.transport.NoModellerTransport`.
- :mod:`~executor.mailbox.crypto`: the task's keys and the sealed formats.
"""
