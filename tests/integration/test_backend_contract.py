"""One contract, every engine: the fake that unit tests trust behaves as each real backend.

The cases are :class:`tests.backend_contract.BackendContract`'s; here they run
over every registered backend, the real ones against their engine and the
sandbox image (the unit suite runs the engine-free ones alone). A backend
registered tomorrow is in this list without an edit here, unless it needs a
fixture of its own to reach its engine (:data:`ENGINE_FIXTURES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from executor.backends import backend_names

from ..backend_contract import BackendContract, Engine, open_engine

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.integration

# The session fixture that proves a backend's engine and images are there (it fails loudly if not).
ENGINE_FIXTURES = {"docker": "docker_client"}


class TestBackendContract(BackendContract):
    @pytest.fixture(params=backend_names())
    def engine(self, request: pytest.FixtureRequest) -> Iterator[Engine]:
        if request.param in ENGINE_FIXTURES:
            request.getfixturevalue(ENGINE_FIXTURES[request.param])
        yield from open_engine(request.param)
