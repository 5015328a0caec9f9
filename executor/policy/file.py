"""Policy files: isolation per project, in TOML.

::

    [default]                 # applies to every project; omitted keys keep
    runtime = "runc"          # the hardened defaults
    memory_mb = 1024

    [projects.oncology]       # overrides [default] for one project
    runtime = "runsc"
    seccomp_profile = "strict.json"        # relative to this file
    secrets = { HF_TOKEN = "env:HF_TOKEN" }
    warm_pool = 2                          # keep two sandboxes booted and waiting
    preload = ["numpy"]                    # imported before a sandbox waits

Every error names the file, the table, the key and what was expected, and is
raised before any container starts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from executor.errors import PolicyError
from executor.policy import IsolationPolicy

# Keys that would loosen what every sandbox gets: named so the error says why.
FLOOR_KEYS = {
    "network": "every sandbox has no network",
    "network_mode": "every sandbox has no network",
    "privileged": "no sandbox is privileged",
    "cap_add": "every sandbox has no capabilities",
    "capabilities": "every sandbox has no capabilities",
    "security_opt": "no-new-privileges and seccomp are always on",
    "no_new_privileges": "no-new-privileges is always on",
    "read_only": "every sandbox has a read-only root",
    "devices": "no devices are passed through (use gpus for GPUs)",
    "volumes": "the only mounts are the datasource, the protocol and the task's socket directory",
    "mounts": "the only mounts are the datasource, the protocol and the task's socket directory",
    "user": "the sandbox never runs as root (set uid_start and uid_count, or uid to pin one, and gid)",
}
_FIELDS = {f.name: f for f in fields(IsolationPolicy)}
# uid is "int | None": a file either pins it or leaves it out.
_INTEGER_FIELDS = {name for name, f in _FIELDS.items() if f.type in ("int", int)} | {"uid"}
_FLOAT_FIELDS = {name for name, f in _FIELDS.items() if f.type in ("float", float)}


@dataclass(frozen=True)
class PolicySet:
    """The policies of every project, from one file.

    Attributes:
        source: The file they came from, if any.
        default: The policy of projects without a table of their own.
        projects: Effective policies of the projects the file names.
    """

    source: Path | None = None
    default: IsolationPolicy = field(default_factory=IsolationPolicy.hardened)
    projects: dict[str, IsolationPolicy] = field(default_factory=dict)

    def for_project(self, project: str) -> IsolationPolicy:
        """The effective policy of ``project``."""
        return self.projects.get(project, self.default)


def load_policy_file(path: Path) -> PolicySet:
    """Read and validate a policy file.

    Raises:
        PolicyError: The file is unreadable, not TOML, or any key is unknown,
            of the wrong type, out of range or would loosen the floor.
    """
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"default", "projects"})
    if unknown:
        raise PolicyError(
            f"{path}: unknown table(s) {', '.join(unknown)}; expected [default] and [projects.NAME]"
        )
    default_table = data.get("default", {})
    if not isinstance(default_table, dict):
        raise PolicyError(f"{path}: [default] must be a table")
    default_values = _values(path, "default", default_table)
    default = _build(path, "default", default_values)
    projects_table = data.get("projects", {})
    if not isinstance(projects_table, dict):
        raise PolicyError(f"{path}: [projects] must hold tables [projects.NAME]")
    projects: dict[str, IsolationPolicy] = {}
    for name, table in projects_table.items():
        where = f"projects.{name}"
        if not isinstance(table, dict):
            raise PolicyError(f"{path}: [{where}] must be a table")
        projects[name] = _build(path, where, {**default_values, **_values(path, where, table)})
    return PolicySet(source=path, default=default, projects=projects)


def _values(path: Path, where: str, table: dict[str, Any]) -> dict[str, Any]:
    """Validate a table's keys and types; turn file references into values."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in FLOOR_KEYS:
            raise PolicyError(f"{path}: [{where}] {key}: cannot be set: {FLOOR_KEYS[key]}")
        if key not in _FIELDS:
            raise PolicyError(
                f"{path}: [{where}] {key}: unknown key; expected one of {', '.join(sorted(_FIELDS))}"
            )
        if key in _INTEGER_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
            raise PolicyError(f"{path}: [{where}] {key}: expected an integer, got {value!r}")
        if key in _FLOAT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PolicyError(f"{path}: [{where}] {key}: expected a number, got {value!r}")
            value = float(value)
        if key in ("runtime", "image") and not isinstance(value, str):
            raise PolicyError(f"{path}: [{where}] {key}: expected a string, got {value!r}")
        if key == "seccomp_profile":
            value = _read_profile(path, where, value)
        if key == "secrets":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise PolicyError(
                    f'{path}: [{where}] secrets: expected a table of NAME = "env:VARIABLE" or "file:/path"'
                )
            value = tuple(sorted(value.items()))
        if key == "preload":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PolicyError(
                    f'{path}: [{where}] preload: expected a list of module names, e.g. ["numpy"]'
                )
            value = tuple(value)
        out[key] = value
    return out


def _read_profile(path: Path, where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError(f"{path}: [{where}] seccomp_profile: expected the path of a JSON file")
    profile = Path(value) if Path(value).is_absolute() else path.parent / value
    try:
        return profile.read_text()
    except OSError as exc:
        raise PolicyError(
            f"{path}: [{where}] seccomp_profile: cannot read {profile} ({exc.strerror})"
        ) from None


def _build(path: Path, where: str, values: dict[str, Any]) -> IsolationPolicy:
    try:
        policy = IsolationPolicy(**values)
        policy.check_warm_pool()
        return policy
    except PolicyError as exc:
        raise PolicyError(f"{path}: [{where}] {exc}") from None
