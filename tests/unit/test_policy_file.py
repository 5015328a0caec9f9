"""Policy files: per-project TOML, validated before any container starts."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from executor.backends import ContainerSpec
from executor.backends.docker import container_kwargs
from executor.cli import main
from executor.errors import PolicyError
from executor.policy import IsolationPolicy
from executor.policy.file import load_policy_file
from executor.policy.seccomp import default_profile_json
from executor.runner import resolve_secrets

if TYPE_CHECKING:
    from pathlib import Path

STRICT_PROFILE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_projects_override_default_which_overrides_hardened(tmp_path):
    (tmp_path / "strict.json").write_text(json.dumps(STRICT_PROFILE))
    path = _write(
        tmp_path,
        """
[default]
memory_mb = 512
timeout_s = 600

[projects.oncology]
runtime = "runsc"
pids = 200
seccomp_profile = "strict.json"
secrets = { HF_TOKEN = "env:HF_TOKEN" }
""",
    )
    policies = load_policy_file(path)
    onc = policies.for_project("oncology")
    assert (onc.runtime, onc.pids, onc.memory_mb, onc.timeout_s) == ("runsc", 200, 512, 600.0)
    assert json.loads(onc.seccomp_profile) == STRICT_PROFILE
    assert onc.secrets == (("HF_TOKEN", "env:HF_TOKEN"),)
    other = policies.for_project("cardiology")
    assert (other.runtime, other.pids, other.memory_mb) == ("runc", 128, 512)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[default]\nmemroy_mb = 5\n", "[default] memroy_mb: unknown key"),
        ('[default]\nmemory_mb = "lots"\n', "[default] memory_mb: expected an integer, got 'lots'"),
        ("[default]\npids = true\n", "[default] pids: expected an integer, got True"),
        ("[projects.x]\ncpus = 1000\n", "[projects.x] cpus: expected a value from 0.05 to 256, got 1000.0"),
        ('[projects.x]\nruntime = "kata"\n', "[projects.x] runtime: expected one of runc, runsc, got 'kata'"),
        ('[default]\nnetwork = "bridge"\n', "[default] network: cannot be set: every sandbox has no network"),
        (
            "[projects.x]\nprivileged = true\n",
            "[projects.x] privileged: cannot be set: no sandbox is privileged",
        ),
        (
            '[projects.x]\ncap_add = ["SYS_ADMIN"]\n',
            "cap_add: cannot be set: every sandbox has no capabilities",
        ),
        ("[projects.x]\nuid = 0\n", "[projects.x] uid: expected a value from 1"),
        ('[projects.x]\nuid = "10001"\n', "[projects.x] uid: expected an integer, got '10001'"),
        ("[default]\nuid_count = 0\n", "[default] uid_count: expected a value from 1"),
        ("[default]\ngid = 0\n", "[default] gid: expected a value from 1"),
        ('[default]\nuser = "0:0"\n', "[default] user: cannot be set: the sandbox never runs as root"),
        ('[default]\nseccomp_profile = "missing.json"\n', "seccomp_profile: cannot read"),
        ('[default]\nsecrets = { K = "plain-value" }\n', 'secrets.K: expected "env:VARIABLE"'),
        ("[default]\ngpus = 100\n", "gpus: expected 0 (none)"),
        ("[default]\ncpu_time_s = -1\n", "[default] cpu_time_s: expected a value from 0"),
        ('[default]\nfile_size_mb = "1m"\n', "[default] file_size_mb: expected a number, got '1m'"),
        (
            '[default]\npreload = "numpy"\n',
            '[default] preload: expected a list of module names, e.g. ["numpy"]',
        ),
        ("[projects.x]\npreload = [1]\n", "[projects.x] preload: expected a list of module names"),
        ('[projects.x]\npreload = ["numpy", "numpy"]\n', "[projects.x] preload: a module is named twice"),
        ('[default]\npreload = ["os;rm"]\n', "[default] preload: 'os;rm' is not a module name"),
        ("[default]\nwarm_pool = true\n", "[default] warm_pool: expected an integer, got True"),
        ("[default]\nwarm_pool = 2.0\n", "[default] warm_pool: expected an integer, got 2.0"),
        ("[projects.x]\nwarm_pool = 17\n", "[projects.x] warm_pool: expected a value from 0 to 16, got 17"),
        ("[default]\nuid_count = 2\nwarm_pool = 2\n", "[default] warm_pool: expected fewer warm sandboxes"),
        (
            "[projects.x]\nuid = 10001\nwarm_pool = 1\n",
            "[projects.x] warm_pool: each warm sandbox holds a uid",
        ),
        ("[other]\n", "unknown table(s) other"),
        ("[default\n", "not valid TOML"),
    ],
)
def test_bad_policy_files_fail_with_file_key_and_expectation(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_seccomp_profile_may_only_be_stricter(tmp_path):
    (tmp_path / "loose.json").write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}))
    path = _write(tmp_path, '[default]\nseccomp_profile = "loose.json"\n')
    with pytest.raises(PolicyError, match="may only be stricter"):
        load_policy_file(path)


def test_seccomp_and_gpus_reach_the_engine_arguments(tmp_path):
    policy = IsolationPolicy(seccomp_profile=json.dumps(STRICT_PROFILE), gpus=1, uid=10_001)
    kw = container_kwargs(ContainerSpec(name="n", command=["x"], policy=policy, mounts=[]))
    assert kw["security_opt"][0] == "no-new-privileges:true"
    # The policy's profile, within the default (clone3 is always "not implemented" under runc).
    assert json.loads(kw["security_opt"][1].removeprefix("seccomp=")) == {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": []},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38, "args": []},
        ],
    }
    assert kw["device_requests"][0].count == 1
    plain = container_kwargs(
        ContainerSpec(name="n", command=["x"], policy=IsolationPolicy(uid=10_001), mounts=[])
    )
    assert plain["device_requests"] == []
    # No profile: the executor's default, never the engine's.
    assert plain["security_opt"][1] == f"seccomp={default_profile_json('runc')}"


def test_secrets_resolve_from_env_and_file_only_when_granted(tmp_path, monkeypatch):
    secret_file = tmp_path / "token"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("MY_TOKEN", "from-env")
    policy = IsolationPolicy(secrets=(("A", "env:MY_TOKEN"), ("B", f"file:{secret_file}")))
    assert resolve_secrets(policy) == {"A": "from-env", "B": "from-file"}
    assert resolve_secrets(IsolationPolicy()) == {}
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(Exception, match="environment variable MY_TOKEN is not set"):
        resolve_secrets(policy)


def test_cli_policy_check_and_show(tmp_path, capsys):
    path = _write(tmp_path, '[default]\nmemory_mb = 256\n[projects.onc]\nruntime = "runsc"\n')
    assert main(["policy", "check", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["policy", "show", str(path), "--project", "onc"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["runtime"], shown["memory_mb"], shown["seccomp_profile"]) == (
        "runsc",
        256,
        "executor default",
    )
    bad = _write(tmp_path, "[default]\nprivileged = true\n")
    assert main(["policy", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sandbox-executor: error: ")
    assert err.count("\n") == 1


def test_cli_run_refuses_a_bad_policy_before_docker(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "protocol.py").write_text("def run(ctx):\n    return 1\n")
    bad = _write(tmp_path, "[default]\nmemory_mb = 1\n")
    code = main(["run", str(tmp_path / "p"), "--data", str(tmp_path), "--policy", str(bad)])
    assert code == 2
    assert "memory_mb: expected a value from 32" in capsys.readouterr().err


def test_uid_keys_pin_one_uid_or_set_the_range_and_group(tmp_path):
    """Files from before per-task uids (``uid = N``) still load: N is pinned."""
    path = _write(
        tmp_path,
        "[default]\nuid_start = 20000\nuid_count = 50\ngid = 4242\n\n[projects.legacy]\nuid = 10001\n",
    )
    policies = load_policy_file(path)
    assert policies.default.uid_range == range(20_000, 20_050)
    assert policies.default.gid == 4242
    legacy = policies.for_project("legacy")
    assert legacy.uid_range == range(10_001, 10_002)
    assert legacy.gid == 4242  # the group comes from [default]


def test_warm_pool_and_preload_load_from_a_file(tmp_path):
    path = _write(
        tmp_path,
        '[default]\nwarm_pool = 2\npreload = ["numpy", "pandas.core"]\n\n[projects.cold]\nwarm_pool = 0\n',
    )
    policies = load_policy_file(path)
    assert (policies.default.warm_pool, policies.default.preload) == (2, ("numpy", "pandas.core"))
    cold = policies.for_project("cold")
    assert (cold.warm_pool, cold.preload) == (0, ("numpy", "pandas.core"))  # the rest from [default]
    assert policies.default.describe()["preload"] == ["numpy", "pandas.core"]


def test_a_pinned_uid_inherited_from_default_refuses_a_project_warm_pool(tmp_path):
    path = _write(tmp_path, "[default]\nuid = 10001\n\n[projects.fast]\nwarm_pool = 1\n")
    with pytest.raises(PolicyError, match=r"\[projects\.fast\] warm_pool: .*pinned to 10001"):
        load_policy_file(path)


def test_result_rows_per_task_load_from_a_file_and_show(tmp_path, capsys):
    path = tmp_path / "policy.toml"
    path.write_text("[default]\nmax_rows = 1000\n\n[projects.big]\nmax_rows_mb = 512\n")
    policies = load_policy_file(path)
    assert (policies.default.max_rows, policies.default.max_rows_mb) == (1000, 64)
    assert (policies.for_project("big").max_rows, policies.for_project("big").max_rows_mb) == (1000, 512)
    assert main(["policy", "show", str(path), "--project", "big"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["max_rows"], shown["max_rows_mb"]) == (1000, 512)
    path.write_text("[default]\nmax_rows_mb = 0.5\n")
    with pytest.raises(PolicyError, match=r"\[default\] max_rows_mb: expected an integer, got 0.5"):
        load_policy_file(path)
