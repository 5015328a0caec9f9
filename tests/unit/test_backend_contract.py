"""The backend contract over the backends that need no engine (the fake); integration runs it over all."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from executor.backends import backend_names

from ..backend_contract import ENGINE_FREE, BackendContract, Engine, open_engine

if TYPE_CHECKING:
    from collections.abc import Iterator


def test_the_fake_is_registered_and_the_contract_covers_it():
    assert set(backend_names()) >= ENGINE_FREE


class TestBackendContract(BackendContract):
    @pytest.fixture(params=[name for name in backend_names() if name in ENGINE_FREE])
    def engine(self, request: pytest.FixtureRequest) -> Iterator[Engine]:
        yield from open_engine(request.param)
