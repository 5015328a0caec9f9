"""The seccomp profile every sandbox runs under, and what a policy's own profile may change in it.

**The default** is Docker 20.10's default profile for a container without
capabilities (every sandbox drops them all, so the rules Docker gates on a
capability never apply and are left out), less what would let a task reach
the operator's files or other tasks through a shared inode, or a large kernel
surface:

* ``flock`` and fcntl's locking, lease and directory-notify commands. A data
  view's file is a hard link to, or a bind mount of, the operator's own
  inode: a lock taken inside would hold off the operator's SQLite writer and
  other tasks for the task's whole life, and a lease or dnotify would tell
  the task when they touch the file. fcntl is allowed by command (an
  allow-list, :data:`FCNTL_ALLOWED`) rather than refused by command: runc and
  gVisor both turn two conditions on one argument into two rules either of
  which matches, so "neither 5 nor 6" cannot be written, and a command a
  later kernel adds is refused until someone looks at it.
* ``inotify_init``, ``inotify_init1`` and ``inotify_add_watch``: a watch on a
  view file sees every open, read and write of that inode by the operator and
  other tasks. (fanotify already needs CAP_SYS_ADMIN.)
* ``io_uring_setup``, ``io_uring_enter`` and ``io_uring_register``, which
  later Docker releases refuse by default too.

A refused call fails with EPERM, like every call the profile does not list
(Docker 20.10 reads no ``defaultErrnoRet``): one answer for "the sandbox
forbids this". SQLite reports it as "access permission denied" (SQLITE_PERM)
rather than "database is locked", which would invite a retry loop; io_uring
users (liburing, libuv) fall back to plain calls on any error.

**A policy's own profile** (``seccomp_profile``) can only take away: the
sandbox may make a call when both the default and the policy's profile allow
it. Every rule of the policy's profile that allows (``SCMP_ACT_ALLOW``,
``SCMP_ACT_LOG``, or ``SCMP_ACT_TRACE``, which a tracer inside could let
through) is intersected with the default: names the default does not allow
leave it, and a name the default allows only with conditions (``fcntl``'s
commands, ``clone``'s flags, ``personality``'s values, per-architecture
calls, ``ptrace`` from kernel 4.8) keeps those conditions as well as the
rule's own. Its refusing rules stay as written. So whatever a policy says,
the refusals above hold and a profile is never looser than the default.

Merging was chosen over refusing such a profile at ``policy check``: the
usual way to refuse one call is a profile of "everything but this", and
making its author re-derive the default's fcntl, clone and personality rules
helps no one, while the intersection is exact and always at least as strict
as both. What cannot be intersected exactly is refused with a one-line error
naming the rule: two conditions on one argument (the engine would apply each
alone, either enough), a condition other than ``SCMP_CMP_EQ`` or
``SCMP_CMP_MASKED_EQ`` on an argument the default already restricts,
``SCMP_ACT_NOTIFY`` and keys Docker 20.10 does not read.

**clone3** passes its flags in memory, out of a filter's sight, so it is
refused with ENOSYS under runc, which makes glibc fall back to ``clone``,
whose flags the default checks.

**Under runsc** gVisor applies the profile itself when registered with
``--oci-seccomp`` (release 2022-12, found by experiment and in its source):
it ignores ``errnoRet`` and answers every refusal with EPERM, on which glibc
does not fall back (no thread could start), so clone3 is left to gVisor,
which answers ENOSYS itself; it takes neither ``SCMP_ACT_LOG`` nor
``SCMP_ACT_KILL_PROCESS``/``SCMP_ACT_KILL_THREAD``, so a policy's profile
that relies on those or on ``errnoRet`` is refused at check; it looks names
up in its own table, which calls pselect6 "pselect" (glibc's select()), so
the profile names it both ways (:data:`GVISOR_NAMES`); and the calls it
does not implement at all (openat2, landlock, futex_waitv, memfd_secret,
process_mrelease) answer EPERM instead of ENOSYS.

The engine gets the profile as JSON text (``security_opt seccomp=<json>``),
built once per profile and runtime.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from executor.errors import PolicyError
from executor.policy.syscalls import (
    ENOSYS,
    EPERM,
    EQ,
    GVISOR_NAMES,
    MASKED_EQ,
    OPS,
    Arg,
    Clause,
    allowed_clauses,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

# -- profiles ----------------------------------------------------------------------

_ALLOW = "SCMP_ACT_ALLOW"
ALLOWING_ACTIONS = frozenset({_ALLOW, "SCMP_ACT_LOG", "SCMP_ACT_TRACE"})
REFUSING_ACTIONS = frozenset(
    {"SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP"}
)
# What gVisor 2022-12's OCI seccomp converts; any other action fails the sandbox's start.
RUNSC_ACTIONS = frozenset({_ALLOW, "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_TRAP", "SCMP_ACT_TRACE"})
# x86-64 hosts admit the i386 and x32 ABIs, arm64 hosts 32-bit arm, as Docker's profile does.
_ARCH_MAP = [
    {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
]
_PROFILE_KEYS = frozenset({"defaultAction", "architectures", "archMap", "syscalls"})
_RULE_KEYS = frozenset({"name", "names", "action", "errnoRet", "args", "comment", "includes", "excludes"})
_FILTER_KEYS = frozenset({"caps", "arches", "minKernel"})
_ARG_KEYS = frozenset({"index", "value", "valueTwo", "op"})
_U64_MAX = 2**64 - 1
MAX_ARGS = 6


def _clone3_rules(runtime: str) -> list[dict[str, Any]]:
    if runtime == "runsc":
        return []  # allowed in the table: gVisor's own ENOSYS
    return [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS, "args": []}]


def _grouped(rules: Iterable[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rules ``(name, rest)`` with identical rests joined into one rule of many names, in first-seen order."""
    groups: dict[str, dict[str, Any]] = {}
    for name, rest in rules:
        key = json.dumps(rest, sort_keys=True)
        group = groups.setdefault(key, {"names": [], **rest})
        if name not in group["names"]:
            group["names"].append(name)
    return list(groups.values())


def _clause_rule(
    clause: Clause, action: str = _ALLOW, includes: dict[str, Any] | None = None
) -> dict[str, Any]:
    rule: dict[str, Any] = {"action": action, "args": [a.to_json() for a in clause.args]}
    merged = dict(includes or {})
    if clause.arches is not None:
        merged["arches"] = list(clause.arches)
    if clause.min_kernel is not None:
        merged["minKernel"] = clause.min_kernel
    if merged:
        rule["includes"] = merged
    return rule


def _check_runtime(runtime: str) -> None:
    if runtime not in ("runc", "runsc"):
        raise ValueError(f"runtime: expected runc or runsc, got {runtime!r}")


@lru_cache(maxsize=2)
def default_profile_json(runtime: str = "runc") -> str:
    """The default profile under ``runtime`` as the JSON text the engine takes (built once)."""
    _check_runtime(runtime)
    table = allowed_clauses(runtime)
    rules = _grouped((name, _clause_rule(c)) for name in sorted(table) for c in table[name])
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "archMap": _ARCH_MAP,
        "syscalls": rules + _clone3_rules(runtime),
    }
    return json.dumps(profile, separators=(",", ":"))


def default_profile(runtime: str = "runc") -> dict[str, Any]:
    """The default profile under ``runtime`` as plain data (a fresh copy)."""
    parsed: dict[str, Any] = json.loads(default_profile_json(runtime))
    return parsed


# -- a policy's own profile ----------------------------------------------------------


def _fail(message: str) -> PolicyError:
    return PolicyError(f"seccomp_profile: {message}")


def _int(value: Any, what: str, *, hi: int = _U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise _fail(f"{what}: expected an integer from 0 to {hi}, got {value!r}")
    return value


def _names(rule: dict[str, Any], where: str) -> list[str]:
    if "name" in rule and "names" in rule:
        raise _fail(f"{where}: has both name and names; Docker takes one")
    names = [rule["name"]] if "name" in rule else rule.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _fail(f"{where}: expected names, a list of syscall names")
    return names


def _kernel(version: Any, where: str) -> tuple[int, int]:
    parts = version.split(".") if isinstance(version, str) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise _fail(f'{where}: minKernel: expected "<kernel>.<major>" such as "4.8", got {version!r}')
    return int(parts[0]), int(parts[1])


def _filter(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not set(value) <= _FILTER_KEYS:
        raise _fail(f"{where}: expected an object with caps, arches or minKernel")
    for key in ("caps", "arches"):
        items = value.get(key, [])
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise _fail(f"{where}: {key}: expected a list of names")
    if value.get("minKernel") not in (None, ""):
        _kernel(value["minKernel"], where)
    return value


def _args(raw: Any, where: str) -> tuple[Arg, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
        raise _fail(f"{where}: args: expected a list of {{index, value, valueTwo, op}} objects")
    out: list[Arg] = []
    for item in raw:
        unknown = set(item) - _ARG_KEYS
        if unknown:
            raise _fail(
                f"{where}: args: unknown key {sorted(unknown)[0]!r} (expected index, value, valueTwo, op)"
            )
        op = item.get("op")
        if op not in OPS:
            raise _fail(f"{where}: args: op must be one of {', '.join(OPS)}, got {op!r}")
        arg = Arg(
            _int(item.get("index"), f"{where}: args: index", hi=MAX_ARGS - 1),
            _int(item.get("value", 0), f"{where}: args: value"),
            op,
            _int(item.get("valueTwo", 0), f"{where}: args: valueTwo"),
        )
        if any(a.index == arg.index for a in out):
            # runc and gVisor make each condition a rule of its own when two
            # share an argument: either one then suffices, which is not what
            # the rule says.
            raise _fail(
                f"{where}: two conditions on argument {arg.index}; the engine would apply each alone "
                "(either one enough), so give each argument at most one condition per rule"
            )
        out.append(arg)
    return tuple(out)


def _both(theirs: Arg, ours: Arg, where: str, name: str) -> Arg | None:
    """One condition meaning both ``theirs`` and ``ours`` (same argument), or None if none can hold."""
    if ours.op == EQ:
        return ours if theirs.holds(ours.value) else None
    # The default's only other condition: clone's flags, a MASKED_EQ.
    if theirs.op == EQ:
        return theirs if ours.holds(theirs.value) else None
    if theirs.op == MASKED_EQ:
        m1, v1, m2, v2 = ours.value, ours.value_two, theirs.value, theirs.value_two
        if v1 & ~m1 or v2 & ~m2 or (v1 ^ v2) & m1 & m2:
            return None
        return Arg(ours.index, m1 | m2, MASKED_EQ, v1 | v2)
    raise _fail(
        f"{where}: {name}'s argument {ours.index} is one the default already restricts "
        f"({MASKED_EQ}); a condition on it must be {EQ} or {MASKED_EQ}, got {theirs.op}"
    )


def _intersect(
    args: tuple[Arg, ...], includes: dict[str, Any], clause: Clause, where: str, name: str
) -> tuple[tuple[Arg, ...], dict[str, Any]] | None:
    """A rule's conditions and ``includes`` and also the default's ``clause``, or None if they never meet."""
    combined = {a.index: a for a in args}
    for ours in clause.args:
        theirs = combined.get(ours.index)
        both = ours if theirs is None else _both(theirs, ours, where, name)
        if both is None:
            return None
        combined[ours.index] = both
    merged = {k: v for k, v in includes.items() if v not in (None, "", [])}
    if clause.arches is not None:
        arches = [a for a in merged.get("arches", clause.arches) if a in clause.arches]
        if not arches:
            return None
        merged["arches"] = arches
    if clause.min_kernel is not None:
        theirs_kernel = merged.get("minKernel")
        if theirs_kernel is None or _kernel(theirs_kernel, where) < _kernel(clause.min_kernel, where):
            merged["minKernel"] = clause.min_kernel
    return tuple(sorted(combined.values(), key=lambda a: a.index)), merged


def _check_action(action: Any, where: str, runtime: str) -> str:
    if action == "SCMP_ACT_NOTIFY":
        raise _fail(f"{where}: SCMP_ACT_NOTIFY needs a listener, which Docker 20.10 cannot give")
    if action not in ALLOWING_ACTIONS | REFUSING_ACTIONS:
        known = ", ".join(sorted(ALLOWING_ACTIONS | REFUSING_ACTIONS))
        raise _fail(f"{where}: expected one of {known}, got {action!r}")
    if runtime == "runsc" and action not in RUNSC_ACTIONS:
        usable = ", ".join(sorted(RUNSC_ACTIONS))
        raise _fail(f"{where}: gVisor (runtime runsc) cannot apply {action}; use one of {usable}")
    return str(action)


def _rules(
    rule: Any, where: str, runtime: str, table: Mapping[str, Sequence[Clause]]
) -> list[tuple[str, dict[str, Any]]]:
    """One rule of a policy's profile as ``(name, rest)`` rules, intersected with the default if it allows."""
    if not isinstance(rule, dict):
        raise _fail(f"{where}: expected an object with names and action")
    unknown = set(rule) - _RULE_KEYS
    if unknown:
        raise _fail(f"{where}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(_RULE_KEYS))})")
    names = _names(rule, where)
    action = _check_action(rule.get("action"), where, runtime)
    if "errnoRet" in rule:
        errno = _int(rule["errnoRet"], f"{where}: errnoRet", hi=4095)
        if runtime == "runsc" and errno != EPERM and action == "SCMP_ACT_ERRNO":
            raise _fail(
                f"{where}: errnoRet {errno}: gVisor (runtime runsc) answers every refusal with EPERM; "
                "drop errnoRet or use runtime runc"
            )
    args = _args(rule.get("args"), where)
    includes = _filter(rule.get("includes"), f"{where}: includes")
    excludes = _filter(rule.get("excludes"), f"{where}: excludes")
    rest: dict[str, Any] = {
        k: v for k, v in rule.items() if k in ("errnoRet", "comment") and v not in (None, "")
    }
    if excludes:
        rest["excludes"] = excludes
    names = [n for n in names if n != "clone3"]  # the default's own rule decides clone3
    if runtime == "runsc":
        names += [GVISOR_NAMES[n] for n in names if n in GVISOR_NAMES and GVISOR_NAMES[n] not in names]
    if action not in ALLOWING_ACTIONS:
        base = {**rest, "action": action, "args": [a.to_json() for a in args]}
        if includes:
            base["includes"] = includes
        return [(name, base) for name in names]
    out: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        for clause in table.get(name, ()):
            met = _intersect(args, includes, clause, where, name)
            if met is not None:
                both_args, both_includes = met
                merged = {**rest, "action": action, "args": [a.to_json() for a in both_args]}
                if both_includes:
                    merged["includes"] = both_includes
                out.append((name, merged))
    return out


def merged_profile(profile: str, runtime: str = "runc") -> dict[str, Any]:
    """A policy's profile (JSON text) intersected with the default under ``runtime``.

    Raises:
        PolicyError: The profile is not one the engine would apply as
            written under ``runtime``, or its default action does not
            refuse (one line, naming the rule and what to do).
    """
    _check_runtime(runtime)
    try:
        parsed = json.loads(profile)
    except ValueError as exc:
        raise _fail(f"expected a JSON seccomp profile, got invalid JSON ({exc})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("syscalls", []), list):
        raise _fail("expected a JSON object with defaultAction and syscalls")
    unknown = set(parsed) - _PROFILE_KEYS
    if unknown:
        raise _fail(
            f"unknown key {sorted(unknown)[0]!r}: Docker 20.10 reads only {', '.join(sorted(_PROFILE_KEYS))}"
        )
    action = parsed.get("defaultAction")
    if action not in REFUSING_ACTIONS:
        raise _fail(
            f"defaultAction must refuse (one of {', '.join(sorted(REFUSING_ACTIONS))}), got {action!r}: "
            "a profile may only be stricter than the default"
        )
    _check_action(action, "defaultAction", runtime)
    if "architectures" in parsed and "archMap" in parsed:
        raise _fail("has both architectures and archMap; Docker takes one")
    table = allowed_clauses(runtime)
    pairs: list[tuple[str, dict[str, Any]]] = []
    for i, rule in enumerate(parsed.get("syscalls") or []):
        pairs += _rules(rule, f"syscalls[{i}]", runtime, table)
    if runtime == "runsc":
        pairs.append(("clone3", {"action": _ALLOW, "args": []}))
    syscalls = _grouped(pairs) + _clone3_rules(runtime)
    return {**parsed, "syscalls": syscalls}


@lru_cache(maxsize=32)
def profile_json(profile: str, runtime: str = "runc") -> str:
    """The JSON text the engine gets for a policy's ``seccomp_profile`` ("" is the default) under ``runtime``.

    Raises:
        PolicyError: As :func:`merged_profile`.
    """
    if not profile:
        return default_profile_json(runtime)
    return json.dumps(merged_profile(profile, runtime), separators=(",", ":"))


# -- gVisor applies a profile only when told to ---------------------------------------

RUNSC_SECCOMP_FLAG = "--oci-seccomp"
_GO_TRUE = {"", "1", "t", "T", "true", "TRUE", "True"}


def runsc_applies_profiles(runtime_args: Sequence[str]) -> bool:
    """Whether runsc started with ``runtime_args`` applies a container's seccomp profile.

    runsc (gVisor) ignores the OCI profile unless given ``--oci-seccomp``
    (Go flag syntax: one or two dashes, an optional ``=value``; the last one wins).
    """
    on = False
    for arg in runtime_args:
        name, _, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "oci-seccomp":
            on = value in _GO_TRUE
    return on
