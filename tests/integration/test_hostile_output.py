"""What a protocol says reaches the operator's terminal inert, and the CLI never crashes on it."""

from __future__ import annotations

import json
import unicodedata

import pytest

from ..conftest import REPO, run_cli

pytestmark = pytest.mark.integration

PROTOCOL = REPO / "tests" / "protocols" / "hostile_text"


def _unsafe(text: str) -> list[str]:
    """Controls (newline aside), DEL, C1, format and bidi controls, surrogates (undecodable bytes)."""
    return [ch for ch in text if ch != "\n" and unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"}]


def _strict_json(text: str) -> dict:
    """Parse as a strict parser would: no NaN/Infinity, no lone surrogates in any string."""

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    doc = json.loads(text, parse_constant=no_constant)
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return doc


@pytest.mark.parametrize(
    ("mode", "status", "error_type"),
    [
        ("ok", "OK", None),
        ("raise", "ERROR", "Evil\x1b[2J\x9b"),
        ("surrogate", "ERROR", "ResultNotSerialisable"),
    ],
)
def test_hostile_text_from_the_sandbox_is_shown_inert(
    data_dir, run_dir, docker_client, cli_env, policy_file, mode, status, error_type
):
    args = (
        "run",
        "--policy",
        str(policy_file),
        str(PROTOCOL),
        "--data",
        str(data_dir),
        "--param",
        f"mode={mode}",
    )
    code = 0 if status == "OK" else 1

    human = run_cli(*args, env=cli_env, timeout=150, errors="surrogateescape")
    assert human.returncode == code, human.stdout + human.stderr
    assert _unsafe(human.stdout) == []
    assert _unsafe(human.stderr) == []
    assert "Traceback" not in human.stdout + human.stderr
    assert human.stdout.splitlines()[0].startswith(f"{status} task ")
    assert "[/]" in human.stdout  # shown as text, not read as markup
    assert "files: 0 processed, 1 failed" in human.stdout
    if error_type is not None:
        assert human.stdout.splitlines()[1].startswith(error_type.encode("unicode_escape").decode())

    machine = run_cli(*args, "--json", env=cli_env, timeout=150, errors="surrogateescape")
    assert machine.returncode == code, machine.stderr
    doc = _strict_json(machine.stdout)
    assert doc["status"] == status
    if error_type is not None:
        assert doc["error"]["type"] == error_type
    assert "Traceback" not in machine.stderr
    assert list(run_dir.iterdir()) == []
