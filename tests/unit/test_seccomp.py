"""The seccomp profile builder and a policy's own profile, judged by what a call would get.

A small evaluator reads a Docker-format profile the way the engine applies it
to a capability-less container on x86-64 (names, per-architecture rules,
``minKernel``, argument conditions, all of a rule's conditions together), so
the tests assert what a protocol's call would meet, not the JSON's shape. The
real engine's filters are compared in ``tests/security/test_seccomp.py``.
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

import pytest

from executor.backends import ContainerSpec, EngineInfo
from executor.backends.docker import RUNSC_IGNORES_SECCOMP, DockerBackend, container_kwargs, engine_info_of
from executor.errors import PolicyError
from executor.policy import IsolationPolicy, seccomp, syscalls
from executor.policy.file import load_policy_file
from executor.runner import Executor
from executor.spec import TaskSpec
from executor.testing.engine import FakeBackend

if TYPE_CHECKING:
    from pathlib import Path

ARCH = "amd64"
KERNEL = (6, 1)
ALLOW, REFUSE = "allow", "refuse"

# Calls the tests ask about: every call the default names, the refused ones,
# and some it never allows.
NEVER = ("unshare", "setns", "mount", "keyctl", "bpf", "kexec_load", "userfaultfd", "perf_event_open")
UNIVERSE = sorted(
    syscalls.ALLOWED
    | set(syscalls.REFUSED)
    | set(syscalls.FCNTL_NAMES)
    | {"clone", "clone3", "personality", "ptrace", "arch_prctl", "modify_ldt", "set_tls", *NEVER}
)
# Argument values that matter to the default's conditions: personality's and
# clone's first argument, fcntl's command (with a high bit a kernel would drop).
FORK_FLAGS = 0x0120_0011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
THREAD_FLAGS = 0x003D_0F00
ARG0 = (
    0,
    3,
    8,
    0x2_0000,
    0x2_0008,
    0xFFFF_FFFF,
    FORK_FLAGS,
    THREAD_FLAGS,
    FORK_FLAGS | syscalls.CLONE_NEWUSER,
)
ARG1 = (*range(0, 40), *range(1024, 1040), 2**32 + 3)


def _kernel(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def _applies(rule: dict[str, Any]) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("caps"):
        return False  # a sandbox has no capabilities
    if inc.get("arches") and ARCH not in inc["arches"]:
        return False
    if inc.get("minKernel") and _kernel(inc["minKernel"]) > KERNEL:
        return False
    if exc.get("arches") and ARCH in exc["arches"]:
        return False
    return not (exc.get("minKernel") and _kernel(exc["minKernel"]) <= KERNEL)


def _matches(rule: dict[str, Any], args: tuple[int, ...]) -> bool:
    return all(
        syscalls.Arg(a["index"], a["value"], a["op"], a.get("valueTwo", 0)).holds(args[a["index"]])
        for a in rule.get("args") or []
    )


def decide(profile: dict[str, Any], name: str, args: tuple[int, ...] = (0,) * 6) -> str:
    """What a call meets: "allow", "refuse", or "errno N" for a refusal with its own errno."""
    allowed, refusal = False, ""
    for rule in profile["syscalls"]:
        names = rule.get("names") or [rule.get("name")]
        if name not in names or not _applies(rule) or not _matches(rule, args):
            continue
        if rule["action"] in seccomp.ALLOWING_ACTIONS:
            allowed = True
        else:
            refusal = f"errno {rule['errnoRet']}" if "errnoRet" in rule else REFUSE
    return refusal or (ALLOW if allowed else REFUSE)


def _grid() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for name in UNIVERSE:
        if name in ("personality", "clone"):
            out += [(name, (a, 0, 0, 0, 0, 0)) for a in ARG0]
        elif name in syscalls.FCNTL_NAMES:
            out += [(name, (fd, cmd, 0, 0, 0, 0)) for fd, cmd in itertools.product((3, 4), ARG1)]
        else:
            out.append((name, (0,) * 6))
    return out


def _profile(*rules: dict[str, Any], default: str = "SCMP_ACT_ERRNO") -> str:
    return json.dumps({"defaultAction": default, "syscalls": list(rules)})


def _allow(names: list[str], *args: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"names": names, "action": "SCMP_ACT_ALLOW", "args": list(args), **extra}


def _arg(index: int, value: int, op: str = "SCMP_CMP_EQ", value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


# -- the default -------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_the_default_refuses_locks_watches_and_io_uring_and_keeps_the_rest(runtime):
    default = seccomp.default_profile(runtime)
    for name in syscalls.REFUSED:
        assert decide(default, name) == REFUSE, name
    for fcntl in syscalls.FCNTL_NAMES:
        for cmd in syscalls.FCNTL_REFUSED:
            assert decide(default, fcntl, (3, cmd, 0, 0, 0, 0)) == REFUSE, (fcntl, cmd)
        for cmd in syscalls.FCNTL_ALLOWED:
            assert decide(default, fcntl, (3, cmd, 0, 0, 0, 0)) == ALLOW, (fcntl, cmd)
        # A command with bits above 32 is not the command the kernel would see: refused.
        assert decide(default, fcntl, (3, 2**32 + 3, 0, 0, 0, 0)) == REFUSE
    for name in ("read", "openat", "symlink", "socket", "mmap", "futex", "inotify_rm_watch", "ptrace"):
        assert decide(default, name) == ALLOW, name
    for name in NEVER:
        assert decide(default, name) == REFUSE, name
    assert decide(default, "clone", (FORK_FLAGS, 0, 0, 0, 0, 0)) == ALLOW
    assert decide(default, "clone", (THREAD_FLAGS, 0, 0, 0, 0, 0)) == ALLOW
    assert decide(default, "clone", (FORK_FLAGS | syscalls.CLONE_NEWUSER, 0, 0, 0, 0, 0)) == REFUSE
    assert [v for v in ARG0 if decide(default, "personality", (v, 0, 0, 0, 0, 0)) == ALLOW] == [
        0,
        8,
        0x2_0000,
        0x2_0008,
        0xFFFF_FFFF,
    ]


def test_clone3_is_not_implemented_under_runc_and_left_to_gvisor_under_runsc():
    # glibc falls back to clone only on ENOSYS; gVisor answers ENOSYS itself
    # but would turn a profile's ENOSYS into EPERM.
    assert decide(seccomp.default_profile("runc"), "clone3") == f"errno {syscalls.ENOSYS}"
    assert decide(seccomp.default_profile("runsc"), "clone3") == ALLOW


def test_the_fcntl_allow_list_and_the_refused_commands_are_apart_and_cover_the_locks():
    assert not set(syscalls.FCNTL_ALLOWED) & set(syscalls.FCNTL_REFUSED)
    # F_GETLK..F_SETLKW, the OFD locks, leases and dnotify, by their Linux numbers.
    assert {5, 6, 7, 36, 37, 38, 1024, 1025, 1026} <= set(syscalls.FCNTL_REFUSED)
    assert {0, 1, 2, 3, 4, 1030, 1031, 1032, 1033, 1034} <= set(syscalls.FCNTL_ALLOWED)


def test_the_default_is_built_once_and_reaches_the_engine_arguments():
    assert seccomp.profile_json("", "runc") is seccomp.default_profile_json("runc")
    for runtime in ("runc", "runsc"):
        kw = container_kwargs(
            ContainerSpec(
                name="n", command=["x"], policy=IsolationPolicy(runtime=runtime, uid=10_001), mounts=[]
            )
        )
        assert kw["security_opt"] == [
            "no-new-privileges:true",
            f"seccomp={seccomp.default_profile_json(runtime)}",
        ]


# -- a policy's own profile ---------------------------------------------------------------

ALL_BUT_SYMLINK = _profile(_allow(sorted(set(UNIVERSE) - {"symlink", "symlinkat"})))
POLICY_PROFILES = {
    "all but symlink": ALL_BUT_SYMLINK,
    "fcntl up to F_SETFL": _profile(_allow(["fcntl", "read"], _arg(1, 4, "SCMP_CMP_LE"))),
    "fcntl F_SETLK only": _profile(_allow(["fcntl"], _arg(1, 6))),
    "fcntl on fd 3": _profile(_allow(["fcntl", "fcntl64", "flock"], _arg(0, 3))),
    "fcntl's 1024 bit": _profile(_allow(["fcntl"], _arg(1, 0x400, "SCMP_CMP_MASKED_EQ", 0x400))),
    "personality from 8": _profile(_allow(["personality"], _arg(0, 8, "SCMP_CMP_GE"))),
    "clone for fork only": _profile(_allow(["clone"], _arg(0, FORK_FLAGS))),
    "clone for threads only": _profile(
        _allow(["clone"], _arg(0, 0x1_0000, "SCMP_CMP_MASKED_EQ", 0x1_0000), _arg(1, 0, "SCMP_CMP_NE"))
    ),
    "arch_prctl on arm64": _profile(_allow(["arch_prctl", "set_tls"], includes={"arches": ["arm64"]})),
    "ptrace from 5.10": _profile(_allow(["ptrace", "clone3"], includes={"minKernel": "5.10"})),
    "refusing rules stay": _profile(
        _allow(["read", "write"]),
        {"names": ["write", "flock"], "action": "SCMP_ACT_KILL"},
        default="SCMP_ACT_TRAP",
    ),
}


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
@pytest.mark.parametrize("which", sorted(POLICY_PROFILES))
def test_a_policys_profile_allows_only_what_it_and_the_default_both_allow(which, runtime):
    profile = POLICY_PROFILES[which]
    theirs, default = json.loads(profile), seccomp.default_profile(runtime)
    merged = seccomp.merged_profile(profile, runtime)
    for name, args in _grid():
        if name == "clone3":
            continue  # the default decides it alone (below)
        got = decide(merged, name, args)
        both = decide(theirs, name, args) == ALLOW and decide(default, name, args) == ALLOW
        if both:
            assert got == ALLOW, (name, args)
        else:
            assert got != ALLOW, (name, args)
    assert decide(merged, "clone3") == decide(default, "clone3")


def test_what_the_intersection_keeps_in_numbers():
    merged = seccomp.merged_profile(POLICY_PROFILES["fcntl up to F_SETFL"])
    assert [c for c in ARG1 if decide(merged, "fcntl", (3, c, 0, 0, 0, 0)) == ALLOW] == [0, 1, 2, 3, 4]
    merged = seccomp.merged_profile(POLICY_PROFILES["fcntl F_SETLK only"])
    assert not any(decide(merged, "fcntl", (3, c, 0, 0, 0, 0)) == ALLOW for c in ARG1)
    merged = seccomp.merged_profile(POLICY_PROFILES["fcntl on fd 3"])
    assert decide(merged, "fcntl", (3, 3, 0, 0, 0, 0)) == ALLOW
    assert decide(merged, "fcntl", (4, 3, 0, 0, 0, 0)) == REFUSE
    assert decide(merged, "fcntl", (3, 6, 0, 0, 0, 0)) == REFUSE
    assert decide(merged, "flock", (3, 0, 0, 0, 0, 0)) == REFUSE
    merged = seccomp.merged_profile(POLICY_PROFILES["ptrace from 5.10"])
    assert [r.get("includes") for r in merged["syscalls"] if "ptrace" in r["names"]] == [
        {"minKernel": "5.10"}
    ]
    merged = seccomp.merged_profile(POLICY_PROFILES["all but symlink"])
    assert decide(merged, "symlink") == REFUSE
    assert decide(merged, "read") == ALLOW
    assert all(decide(merged, name) == REFUSE for name in [*syscalls.REFUSED, *NEVER])


def test_refusing_rules_keep_their_own_action_and_errno():
    profile = _profile(
        _allow(["read"]),
        {"names": ["symlink"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        {"names": ["clone3"], "action": "SCMP_ACT_KILL"},
    )
    merged = seccomp.merged_profile(profile, "runc")
    assert decide(merged, "symlink") == "errno 13"
    # clone3 is the default's to decide: a kill or EPERM would stop every thread from starting.
    assert decide(merged, "clone3") == f"errno {syscalls.ENOSYS}"


def test_a_refused_call_in_a_policy_profile_meets_the_profiles_own_default_action():
    merged = seccomp.merged_profile(_profile(_allow(["read", "flock"]), default="SCMP_ACT_KILL_PROCESS"))
    assert merged["defaultAction"] == "SCMP_ACT_KILL_PROCESS"
    assert not any("flock" in r["names"] for r in merged["syscalls"])


@pytest.mark.parametrize(
    ("profile", "runtime", "message"),
    [
        ("{", "runc", "invalid JSON"),
        (json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}), "runc", "may only be stricter"),
        (
            json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1, "syscalls": []}),
            "runc",
            "unknown key 'defaultErrnoRet': Docker 20.10 reads only",
        ),
        (
            _profile({"names": ["read"], "action": "SCMP_ACT_ALLOW", "arg": []}),
            "runc",
            "syscalls[0]: unknown key 'arg'",
        ),
        (
            _profile({"names": ["read"], "action": "SCMP_ACT_NOTIFY"}),
            "runc",
            "SCMP_ACT_NOTIFY needs a listener",
        ),
        (_profile({"names": ["read"], "action": "SCMP_ACT_BLESS"}), "runc", "syscalls[0]: expected one of"),
        (
            _profile({"name": "read", "names": ["read"], "action": "SCMP_ACT_ALLOW"}),
            "runc",
            "both name and names",
        ),
        (_profile({"names": [], "action": "SCMP_ACT_ALLOW"}), "runc", "expected names"),
        (
            _profile(_allow(["fcntl"], _arg(1, 3, "SCMP_CMP_GE"), _arg(1, 4, "SCMP_CMP_LE"))),
            "runc",
            "syscalls[0]: two conditions on argument 1; the engine would apply each alone",
        ),
        (_profile(_allow(["read"], _arg(7, 0))), "runc", "index: expected an integer from 0 to 5"),
        (_profile(_allow(["read"], _arg(0, -1))), "runc", "value: expected an integer from 0"),
        (
            _profile(_allow(["read"], {"index": 0, "value": 1, "op": "SCMP_CMP_LIKE"})),
            "runc",
            "op must be one of",
        ),
        (
            _profile(_allow(["clone"], _arg(0, 5, "SCMP_CMP_GT"))),
            "runc",
            "clone's argument 0 is one the default already restricts",
        ),
        (
            _profile(_allow(["ptrace"], includes={"minKernel": "four"})),
            "runc",
            'minKernel: expected "<kernel>.<major>"',
        ),
        (
            json.dumps(
                {"defaultAction": "SCMP_ACT_ERRNO", "architectures": [], "archMap": [], "syscalls": []}
            ),
            "runc",
            "both architectures and archMap",
        ),
        (
            _profile({"names": ["read"], "action": "SCMP_ACT_LOG"}),
            "runsc",
            "gVisor (runtime runsc) cannot apply SCMP_ACT_LOG",
        ),
        (
            _profile(_allow(["read"]), default="SCMP_ACT_KILL_PROCESS"),
            "runsc",
            "cannot apply SCMP_ACT_KILL_PROCESS",
        ),
        (
            _profile({"names": ["symlink"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}),
            "runsc",
            "errnoRet 13: gVisor (runtime runsc) answers every refusal with EPERM",
        ),
    ],
)
def test_a_profile_the_engine_would_not_apply_as_written_is_refused_in_one_line(profile, runtime, message):
    with pytest.raises(PolicyError) as info:
        IsolationPolicy(runtime=runtime, seccomp_profile=profile)
    assert str(info.value).startswith("seccomp_profile: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_what_runsc_cannot_apply_is_fine_under_runc():
    for profile in (
        _profile({"names": ["read"], "action": "SCMP_ACT_LOG"}),
        _profile({"names": ["symlink"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13}),
    ):
        assert IsolationPolicy(runtime="runc", seccomp_profile=profile).seccomp_profile == profile


def test_policy_check_names_the_file_table_and_rule(tmp_path: Path):
    (tmp_path / "p.json").write_text(
        _profile({"names": ["symlink"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13})
    )
    policy = tmp_path / "policy.toml"
    policy.write_text('[projects.g]\nruntime = "runsc"\nseccomp_profile = "p.json"\n')
    with pytest.raises(PolicyError) as info:
        load_policy_file(policy)
    assert str(info.value).startswith(f"{policy}: [projects.g] seccomp_profile: syscalls[0]: errnoRet 13")


# -- runsc applies a profile only when registered with --oci-seccomp ---------------------


@pytest.mark.parametrize(
    ("args", "applies"),
    [
        ((), False),
        (("--network=none", "--host-uds=open"), False),
        (("--network=none", "--oci-seccomp"), True),
        (("-oci-seccomp",), True),
        (("--oci-seccomp=true",), True),
        (("--oci-seccomp=1",), True),
        (("--oci-seccomp=false",), False),
        (("--oci-seccomp", "--oci-seccomp=false"), False),
        (("--oci-seccomp=false", "--oci-seccomp"), True),
        (("oci-seccomp",), False),  # not a flag
        (("--oci-seccomp-x",), False),
    ],
)
def test_runsc_applies_profiles_only_with_oci_seccomp(args, applies):
    assert seccomp.runsc_applies_profiles(args) is applies


def _engine(monkeypatch: pytest.MonkeyPatch, runsc_args: tuple[str, ...] | None) -> list[int]:
    calls: list[int] = []
    runtimes: dict[str, object] = {"runc": {"path": "runc"}}
    if runsc_args is not None:
        runtimes["runsc"] = {"path": "/usr/bin/runsc", "runtimeArgs": list(runsc_args)}

    def info(self: DockerBackend) -> EngineInfo:
        calls.append(1)
        return engine_info_of({"ServerVersion": "20.10", "CgroupVersion": "2", "Runtimes": runtimes})

    monkeypatch.setattr(DockerBackend, "engine_info", info)
    return calls


STRICT = _profile(_allow(sorted(syscalls.ALLOWED)))


def test_a_runsc_task_with_a_profile_is_refused_when_gvisor_would_ignore_it(monkeypatch):
    calls = _engine(monkeypatch, ("--network=none", "--host-uds=open"))
    backend = DockerBackend(client=object())  # type: ignore[arg-type]
    with pytest.raises(PolicyError) as info:
        backend.check_runtime(IsolationPolicy(runtime="runsc", seccomp_profile=STRICT))
    assert str(info.value) == RUNSC_IGNORES_SECCOMP
    assert "--oci-seccomp" in RUNSC_IGNORES_SECCOMP
    assert "sudo make runsc" in RUNSC_IGNORES_SECCOMP
    # The default profile is not refused (gVisor keeps locks and watches inside);
    # runc and profile-less policies do not even ask the engine.
    backend.check_runtime(IsolationPolicy(runtime="runsc"))
    backend.check_runtime(IsolationPolicy(runtime="runc", seccomp_profile=STRICT))
    assert len(calls) == 1


def test_a_runsc_registered_with_oci_seccomp_takes_a_profile(monkeypatch):
    _engine(monkeypatch, ("--network=none", "--host-uds=open", "--oci-seccomp"))
    DockerBackend(client=object()).check_runtime(  # type: ignore[arg-type]
        IsolationPolicy(runtime="runsc", seccomp_profile=STRICT)
    )


def test_the_check_runs_before_anything_is_made(tmp_path):
    class Refusing(FakeBackend):
        def check_runtime(self, policy: IsolationPolicy) -> None:
            raise PolicyError(RUNSC_IGNORES_SECCOMP)

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("x\n")
    protocol = tmp_path / "protocol"
    protocol.mkdir()
    (protocol / "protocol.py").write_text("def run(ctx):\n    return 1\n")
    backend = Refusing()
    run_dir = tmp_path / "run"
    executor = Executor(
        backend,
        policy=IsolationPolicy(runtime="runsc", seccomp_profile=STRICT, timeout_s=10),
        run_dir=run_dir,
        spool_dir=tmp_path / "spool",
        uid_dir=tmp_path / "uids",
    )
    with pytest.raises(PolicyError, match="--oci-seccomp"):
        executor.run(TaskSpec(protocol_dir=protocol, data_dir=data))
    assert [op for op, _ in backend.calls if op == "create"] == []
    assert not run_dir.exists() or not list(run_dir.iterdir())


def test_under_runsc_a_call_gvisor_names_differently_is_named_both_ways():
    # glibc's select() is pselect6, which gVisor's table calls "pselect": without
    # the second name gVisor would skip the rule and refuse every select().
    assert decide(seccomp.default_profile("runsc"), "pselect") == ALLOW
    assert decide(seccomp.default_profile("runc"), "pselect") == REFUSE
    merged = seccomp.merged_profile(_profile(_allow(["pselect6", "read"])), "runsc")
    assert decide(merged, "pselect") == ALLOW
    assert decide(merged, "pselect6") == ALLOW
    refusing = seccomp.merged_profile(
        _profile(_allow(["read"]), {"names": ["pselect6"], "action": "SCMP_ACT_KILL"}), "runsc"
    )
    assert [r["action"] for r in refusing["syscalls"] if "pselect" in r["names"]] == ["SCMP_ACT_KILL"]
