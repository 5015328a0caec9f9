"""The exceptions the parent side raises, all rooted at one base.

::

    SandboxExecutorError
    ├── ConfigurationError          bad input caught before any container starts
    │   ├── PolicyError             an isolation policy value or file is wrong
    │   ├── ProtocolBundleError     the protocol directory is unusable
    │   └── DataSourceError         the data directory is unusable
    ├── CapacityError               no room for another task now (e.g. every sandbox uid in use)
    └── BackendError                the container engine failed us
        ├── EngineUnavailableError  the engine cannot be reached
        ├── ImageNotFoundError      the sandbox image is not built
        └── ContainerError          a container could not be created or started

A protocol that fails is not an exception on the parent side: it is an
:class:`~executor.outcome.Outcome` with a non-OK status.
"""

from __future__ import annotations


class SandboxExecutorError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigurationError(SandboxExecutorError):
    """The task, policy, protocol or data given to the executor is unusable."""


class PolicyError(ConfigurationError):
    """An isolation policy value is out of range or of the wrong type."""


class ProtocolBundleError(ConfigurationError):
    """The protocol directory cannot be turned into a bundle."""


class DataSourceError(ConfigurationError):
    """The data directory cannot be mounted into the sandbox."""


class CapacityError(SandboxExecutorError):
    """The task cannot start now because a host-wide resource is all in use.

    Retrying after another task ends may succeed; nothing was started.
    """


class BackendError(SandboxExecutorError):
    """The container engine failed.

    Attributes:
        task_id: The task that was being run, when known.
        container_id: The container concerned, when one exists.
    """

    def __init__(self, message: str, *, task_id: str | None = None, container_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.container_id = container_id


class EngineUnavailableError(BackendError):
    """The Docker engine cannot be reached."""


class ImageNotFoundError(BackendError):
    """The sandbox image named by the policy does not exist locally."""


class ContainerError(BackendError):
    """A container could not be created, started or inspected."""
