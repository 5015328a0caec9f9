"""The data lifecycle: which files a task may see, the view that shows only those, and the project store.

It may import the domain (``spec``, ``policy``, ``errors``) and the task room's low-level
helpers it shares nothing with; the task lifecycle and the API import it, never the reverse.
"""
