"""TaskSpec groups its flags and inference limits the way the proto does, and refuses bad values up front."""

from __future__ import annotations

from pathlib import Path

import pytest

import executor
from executor.errors import ConfigurationError
from executor.spec import InferenceLimits, TaskFlags, TaskSpec


def test_a_spec_without_groups_runs_with_no_flags_and_no_limits():
    spec = TaskSpec(protocol_dir=Path("p"), data_dir=Path("d"))
    assert spec.flags == TaskFlags()
    assert not any(vars(spec.flags).values())
    assert spec.inference_limits == InferenceLimits(max_files=0, max_batches=0)


def test_the_groups_are_public_and_frozen():
    assert executor.TaskFlags is TaskFlags
    assert executor.InferenceLimits is InferenceLimits
    with pytest.raises(AttributeError):
        TaskFlags().test_run = True  # type: ignore[misc]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_flag_that_is_not_a_bool_is_refused_by_name(value):
    with pytest.raises(ConfigurationError, match=r"flags\.test_run"):
        TaskFlags(test_run=value)


@pytest.mark.parametrize("value", [-1, 2**64, 1.5, True, "3"])
def test_an_inference_limit_outside_uint64_is_refused_by_name(value):
    with pytest.raises(ConfigurationError, match=r"inference_limits\.max_files"):
        InferenceLimits(max_files=value)


def test_a_group_of_the_wrong_type_is_refused_before_anything_runs():
    with pytest.raises(ConfigurationError, match="flags: expected a TaskFlags, got dict"):
        TaskSpec(protocol_dir=Path("p"), data_dir=Path("d"), flags={"test_run": True})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="inference_limits"):
        TaskSpec(protocol_dir=Path("p"), data_dir=Path("d"), inference_limits=3)  # type: ignore[arg-type]
