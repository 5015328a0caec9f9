"""The engines sandboxes can run on, by name: one registration line per engine.

The executor, ``doctor`` and the reaper open their engine here, never by
naming a backend class. A new engine is a module in ``executor/backends/``
and a :func:`register_backend` line at the bottom of this one; a backend that
lives elsewhere (the test kit's fake) registers itself when imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from executor.errors import ConfigurationError

if TYPE_CHECKING:
    from executor.backends import ContainerBackend

BackendFactory = Callable[..., "ContainerBackend"]

DEFAULT_BACKEND = "docker"

_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``open_backend(name, **options)`` call ``factory(**options)``.

    Raises:
        ValueError: ``name`` is taken by another factory.
    """
    known = _FACTORIES.get(name)
    if known is not None and known is not factory:
        raise ValueError(f"backend {name!r} is registered already")
    _FACTORIES[name] = factory


def backend_names() -> tuple[str, ...]:
    """Every registered backend's name, in the order they were registered."""
    return tuple(_FACTORIES)


def open_backend(name: str = DEFAULT_BACKEND, **options: Any) -> ContainerBackend:
    """The backend registered as ``name``, made with ``options`` (it connects on first use).

    Raises:
        ConfigurationError: No backend is registered as ``name``.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigurationError(
            f"backend: expected one of {', '.join(backend_names()) or 'none'}, got {name!r}"
        )
    return factory(**options)


def lazily(module: str, attribute: str) -> BackendFactory:
    """A factory that imports ``module`` only when a backend is opened (an engine's client is heavy).

    The class is looked up at each call, so a test that replaces it in its
    module is obeyed.
    """

    def factory(**options: Any) -> ContainerBackend:
        backend: ContainerBackend = getattr(importlib.import_module(module), attribute)(**options)
        return backend

    return factory


register_backend("docker", lazily("executor.backends.docker", "DockerBackend"))
