"""IsolationPolicy: hardened defaults, and every bad value refused with the key it concerns."""

from __future__ import annotations

import dataclasses
import math

import pytest

from executor.errors import ConfigurationError, PolicyError
from executor.policy import DEFAULT_IMAGE, IsolationPolicy
from executor.runner import Executor
from executor.testing import FakeBackend


def test_defaults_are_the_hardened_values():
    p = IsolationPolicy.hardened()
    assert p == IsolationPolicy()
    assert (p.runtime, p.image) == ("runc", DEFAULT_IMAGE)
    assert p.uid is None  # each task gets a uid of its own from the range
    assert p.uid_range == range(10_001, 10_001 + 4096)  # never root
    assert p.gid == 10_001
    assert (p.memory_mb, p.cpus, p.pids, p.nofile, p.tmpfs_mb) == (1024, 1.0, 128, 1024, 64)
    assert (p.timeout_s, p.heartbeat_interval_s, p.heartbeat_timeout_s) == (3600.0, 1.0, 30.0)
    assert (p.max_message_mb, p.max_task_mb, p.max_result_mb) == (512, 4096, 1.0)
    assert p.max_message_bytes == 512 * 1024 * 1024
    assert p.max_task_bytes == 4096 * 1024 * 1024
    assert p.max_result_bytes == 1024 * 1024


def test_policy_is_frozen():
    p = IsolationPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.memory_mb = 1_000_000  # type: ignore[misc]


def test_policy_error_is_a_configuration_error():
    assert issubclass(PolicyError, ConfigurationError)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("memory_mb", 31),
        ("memory_mb", 262_145),
        ("cpus", 0),
        ("cpus", 0.01),
        ("cpus", 257.0),
        ("cpus", math.nan),
        ("cpus", math.inf),
        ("pids", 15),
        ("pids", 4097),
        ("nofile", 63),
        ("nofile", 65_537),
        ("tmpfs_mb", 0),
        ("timeout_s", 0.5),
        ("timeout_s", 7 * 24 * 3600 + 1),
        ("heartbeat_interval_s", 0.01),
        ("heartbeat_timeout_s", 3601),
        ("max_message_mb", 0),
        ("max_message_mb", 4097),
        ("max_task_mb", 65_537),
        ("max_result_mb", 0),
        ("max_result_mb", 65),
        ("uid", 0),
        ("uid", -1),
        ("uid", 2**31),
        ("uid_start", 0),
        ("uid_count", 0),
        ("uid_count", 65_537),
        ("gid", 0),  # never the root group
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(key, value):
    with pytest.raises(PolicyError, match=rf"^{key}: expected a value from") as info:
        IsolationPolicy(**{key: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("memory_mb", 32),
        ("memory_mb", 262_144),
        ("cpus", 0.05),
        ("cpus", 2),  # an int is a fine number of cores
        ("pids", 16),
        ("uid", 1),
        ("max_result_mb", 0.001),
        ("timeout_s", 1),
    ],
)
def test_boundary_values_are_accepted(key, value):
    assert getattr(IsolationPolicy(**{key: value}), key) == value


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("memory_mb", True, "an integer"),
        ("pids", False, "an integer"),
        ("cpus", True, "a number"),
        ("memory_mb", "1024", "an integer"),
        ("cpus", "1.0", "a number"),
        ("timeout_s", "60", "a number"),
        ("memory_mb", 1024.0, "an integer"),
        ("pids", 64.5, "an integer"),
        ("uid", 10001.0, "an integer"),
        ("uid", "10001", "an integer"),
        ("uid_start", 10001.0, "an integer"),
        ("gid", True, "an integer"),
        ("nofile", None, "an integer"),
        ("max_message_mb", [512], "an integer"),
    ],
)
def test_wrong_types_are_refused_naming_the_key(key, value, expected):
    with pytest.raises(PolicyError, match=rf"^{key}: expected {expected}, got "):
        IsolationPolicy(**{key: value})


@pytest.mark.parametrize("runtime", ["kata", "RUNC", "runc ", "", "runsc-debug", None])
def test_unknown_runtime_is_refused(runtime):
    with pytest.raises(PolicyError, match=r"^runtime: expected one of runc, runsc"):
        IsolationPolicy(runtime=runtime)


def test_both_known_runtimes_are_accepted():
    assert IsolationPolicy(runtime="runsc").runtime == "runsc"
    assert IsolationPolicy(runtime="runc").runtime == "runc"


@pytest.mark.parametrize(
    "image",
    [
        "",
        "Sandbox/Upper:latest",
        "sandbox image",
        "sandbox;rm -rf /",
        "../escape",
        "-flag",
        "sandbox:",
        "sandbox@sha256:abc",
        "a" * 202,
        42,
        None,
    ],
)
def test_bad_image_references_are_refused(image):
    with pytest.raises(PolicyError, match=r"^image: expected a Docker image reference"):
        IsolationPolicy(image=image)


def test_image_reference_with_trailing_newline_is_refused():
    with pytest.raises(PolicyError, match=r"^image:"):
        IsolationPolicy(image=DEFAULT_IMAGE + "\n")


@pytest.mark.parametrize(
    "image",
    [
        "sandbox-executor/sandbox:latest",
        "sandbox-executor/numpy:1.0",
        "python:3.11-slim",
        "sandbox-executor/sandbox@sha256:" + "0" * 64,
    ],
)
def test_good_image_references_are_accepted(image):
    assert IsolationPolicy(image=image).image == image


def test_replace_applies_and_keeps_the_original():
    base = IsolationPolicy()
    tighter = base.replace(memory_mb=256, pids=200, runtime="runsc")
    assert (tighter.memory_mb, tighter.pids, tighter.runtime) == (256, 200, "runsc")
    assert (base.memory_mb, base.pids, base.runtime) == (1024, 128, "runc")
    assert tighter.image == base.image


def test_replace_validates_the_new_values():
    with pytest.raises(PolicyError, match=r"^memory_mb:"):
        IsolationPolicy().replace(memory_mb=8)
    with pytest.raises(PolicyError, match=r"^uid:"):
        IsolationPolicy().replace(uid=0)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"network": "host"}, "network"),
        ({"privileged": True, "memory_mb": 2048}, "privileged"),
        ({"cap_add": ["SYS_ADMIN"], "volumes": ["/:/host"]}, "cap_add, volumes"),
    ],
)
def test_replace_refuses_unknown_keys_naming_them(changes, named):
    with pytest.raises(PolicyError, match=rf"^unknown policy key\(s\): {named}$"):
        IsolationPolicy().replace(**changes)


def test_heartbeat_timeout_must_exceed_the_interval():
    with pytest.raises(PolicyError, match=r"^heartbeat_timeout_s: expected more than heartbeat_interval_s"):
        IsolationPolicy(heartbeat_interval_s=5.0, heartbeat_timeout_s=5.0)
    with pytest.raises(PolicyError, match=r"^heartbeat_timeout_s:"):
        IsolationPolicy(heartbeat_interval_s=5.0, heartbeat_timeout_s=2.0)
    # Raising the interval past the default timeout is caught too.
    with pytest.raises(PolicyError, match=r"^heartbeat_timeout_s:"):
        IsolationPolicy().replace(heartbeat_interval_s=45.0)
    ok = IsolationPolicy(heartbeat_interval_s=5.0, heartbeat_timeout_s=5.5)
    assert ok.heartbeat_timeout_s > ok.heartbeat_interval_s


def test_each_task_gets_a_uid_from_the_range_unless_one_is_pinned():
    ranged = IsolationPolicy(uid_start=20_000, uid_count=10, gid=777)
    assert ranged.uid_range == range(20_000, 20_010)
    assert ranged.gid == 777
    pinned = ranged.replace(uid=12_345)
    assert pinned.uid_range == range(12_345, 12_346)
    assert pinned.describe()["uid"] == 12_345
    assert ranged.describe()["uid"] is None


def test_the_uid_range_may_not_run_past_the_largest_id():
    with pytest.raises(PolicyError, match=r"^uid_count: the range from uid_start"):
        IsolationPolicy(uid_start=2**31 - 10, uid_count=100)
    assert IsolationPolicy(uid_start=2**31 - 11, uid_count=10).uid_range[-1] == 2**31 - 2


# -- warm pools and preloaded modules -------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 16])
def test_warm_pool_sizes_in_range_are_accepted(size):
    assert IsolationPolicy(warm_pool=size).warm_pool == size


@pytest.mark.parametrize("size", [-1, 17])
def test_warm_pool_out_of_range_is_refused(size):
    with pytest.raises(PolicyError, match=rf"^warm_pool: expected a value from 0 to 16, got {size}$"):
        IsolationPolicy(warm_pool=size)


@pytest.mark.parametrize("value", [True, 2.0, "2", None])
def test_warm_pool_must_be_an_integer(value):
    with pytest.raises(PolicyError, match=r"^warm_pool: expected an integer, got "):
        IsolationPolicy(warm_pool=value)


def test_warm_pool_needs_a_uid_for_each_sandbox_and_task():
    with pytest.raises(PolicyError, match=r"^warm_pool: expected fewer warm sandboxes than uid_count \(4\)"):
        IsolationPolicy(uid_count=4, warm_pool=4)
    with pytest.raises(PolicyError, match=r"^warm_pool: expected fewer"):
        IsolationPolicy(uid_count=4).replace(warm_pool=5)
    assert IsolationPolicy(uid_count=4, warm_pool=3).warm_pool == 3


def test_a_warm_pool_with_a_pinned_uid_is_refused_by_check_warm_pool():
    pinned = IsolationPolicy(warm_pool=2, uid=10_001)  # valid as a slot's own copy of the policy
    with pytest.raises(PolicyError, match=r"^warm_pool: .*unset uid \(pinned to 10001\)") as info:
        pinned.check_warm_pool()
    assert "\n" not in str(info.value)
    IsolationPolicy(warm_pool=2).check_warm_pool()
    IsolationPolicy(uid=10_001).check_warm_pool()


def test_an_executor_refuses_a_warm_pool_with_a_pinned_uid(tmp_path):
    backend = FakeBackend()
    with pytest.raises(PolicyError, match=r"^warm_pool:"):
        Executor(
            backend,
            policy=IsolationPolicy(warm_pool=2, uid=5),
            run_dir=tmp_path / "run",
            spool_dir=tmp_path / "spool",
            uid_dir=tmp_path / "uids",
        )
    assert backend.calls == []


@pytest.mark.parametrize(
    "preload",
    [(), ("numpy",), ("pandas.core", "numpy", "_private.mod_2"), tuple(f"m{i}" for i in range(64))],
)
def test_good_preload_lists_are_accepted_and_described(preload):
    p = IsolationPolicy(preload=preload)
    assert p.preload == preload
    assert p.describe()["preload"] == list(preload)


@pytest.mark.parametrize(
    ("preload", "message"),
    [
        ("numpy", r"^preload: expected a list of module names"),
        (["numpy"], r"^preload: expected a list of module names"),
        (("numpy", 3), r"^preload: expected a list of module names"),
        ((b"numpy",), r"^preload: expected a list of module names"),
        (("",), r"^preload: '' is not a module name"),
        (("numpy.",), r"^preload: 'numpy\.' is not a module name"),
        ((".numpy",), r"^preload: '\.numpy' is not a module name"),
        (("numpy..core",), r"^preload: 'numpy\.\.core' is not a module name"),
        (("1numpy",), r"^preload: '1numpy' is not a module name"),
        (("os; import sys",), r"^preload: 'os; import sys' is not a module name"),
        (("numpy\n",), r"^preload: 'numpy\\n' is not a module name"),
        (("pandas-core",), r"^preload: 'pandas-core' is not a module name"),
        (("numpy", "json", "numpy"), r"^preload: a module is named twice$"),
        (tuple(f"m{i}" for i in range(65)), r"^preload: expected at most 64 modules, got 65$"),
    ],
)
def test_bad_preload_lists_are_refused_in_one_line(preload, message):
    with pytest.raises(PolicyError, match=message) as info:
        IsolationPolicy(preload=preload)
    assert "\n" not in str(info.value)


def test_result_rows_per_task_default_to_half_a_million_and_64_mib():
    p = IsolationPolicy()
    assert (p.max_rows, p.max_rows_mb, p.max_rows_bytes) == (500_000, 64, 64 * 1024 * 1024)
    assert IsolationPolicy(max_rows=1, max_rows_mb=1).max_rows_bytes == 1024 * 1024
    assert IsolationPolicy(max_rows=100_000_000, max_rows_mb=65_536).max_rows == 100_000_000


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_rows", 0), ("max_rows", 100_000_001), ("max_rows_mb", 0), ("max_rows_mb", 65_537)],
)
def test_result_rows_per_task_out_of_range_are_refused(key, value):
    with pytest.raises(PolicyError, match=rf"^{key}: expected a value from 1 to "):
        IsolationPolicy(**{key: value})


@pytest.mark.parametrize("key", ["max_rows", "max_rows_mb"])
def test_result_rows_per_task_must_be_whole_numbers(key):
    with pytest.raises(PolicyError, match=rf"^{key}: expected an integer, got 1.5"):
        IsolationPolicy(**{key: 1.5})
