"""The task lifecycle: admission, sandbox assembly, warm slots, supervision, output and clean-up.

Everything between "this task may run on this data" and "its ledger row is closed". It may
import the domain (``spec``, ``policy``, ``errors``, ``outcome``, ``events``, ``hooks``), the
data room, the rpc and mailbox rooms and the backends; nothing imports it but the API
(``runner``), the CLI and the test kit.
"""
