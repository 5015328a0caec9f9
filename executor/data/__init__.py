"""The data lifecycle: which files a task may see, the view that shows it only those, and the project store.

Scanning (``scan``), choosing and batching (``selection``), the path rules of a
view (``viewpaths``), the same-filesystem check (``filesystem``) and the view
itself (``view``); the store's records and protocol (``store``), its kinds
(``sqlite/``, ``memory``) and :func:`~executor.data.stores.open_store`; what a
task reports of its files and rows (``fileoutcomes``, ``resultrows``) and its
log tail (``logtail``). It imports only the lower layers (errors, paths,
policy, mailbox, spec, backends, the sandbox contract); the task lifecycle
and the API import it, never the reverse.
"""
