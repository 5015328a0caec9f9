"""Every key that would loosen the floor is refused by name, in any table of a policy file."""

from __future__ import annotations

import re

import pytest

from executor.errors import PolicyError
from executor.policy import IsolationPolicy
from executor.policy.file import FLOOR_KEYS, load_policy_file

# The floor keys the README names; the loader's list must hold at least these.
README_FLOOR_KEYS = {"network", "privileged", "cap_add", "security_opt", "read_only", "volumes"}


def test_the_readme_floor_keys_are_all_in_the_loaders_list():
    assert set(FLOOR_KEYS) >= README_FLOOR_KEYS


def test_no_floor_key_is_a_policy_field():
    # A floor key that were also a field could be set through replace().
    fields = set(IsolationPolicy.hardened().describe())
    assert not fields & set(FLOOR_KEYS)


@pytest.mark.parametrize("key", sorted(FLOOR_KEYS))
@pytest.mark.parametrize("table", ["default", "projects.oncology"])
def test_each_floor_key_is_refused_by_name(tmp_path, key, table):
    path = tmp_path / "policy.toml"
    path.write_text(f"[{table}]\nmemory_mb = 512\n{key} = true\n")
    with pytest.raises(PolicyError) as raised:
        load_policy_file(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: [{table}] {key}: cannot be set: ")
    # The reason given is the one the loader holds for this key, not "unknown key".
    assert message.endswith(FLOOR_KEYS[key])
    assert not re.search(r"unknown key", message)
