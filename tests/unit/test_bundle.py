"""Protocol bundles: checked without running them, copied read-only, refused when unsafe."""

from __future__ import annotations

import ast
import os
import stat
import threading
import time

import pytest

import executor.task.bundle
from executor.errors import ConfigurationError, ProtocolBundleError
from executor.task.bundle import check_protocol_dir, copy_bundle


def _one_line_error(source, match):
    with pytest.raises(ProtocolBundleError, match=match) as info:
        check_protocol_dir(source)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bundle_error_is_a_configuration_error():
    assert issubclass(ProtocolBundleError, ConfigurationError)


def test_missing_directory(tmp_path):
    message = _one_line_error(tmp_path / "nope", "does not exist or is not a directory")
    assert str(tmp_path / "nope") in message


def test_a_file_is_not_a_protocol_directory(tmp_path):
    path = tmp_path / "protocol.py"
    path.write_text("def run(ctx): pass\n")
    _one_line_error(path, "does not exist or is not a directory")


def test_missing_protocol_py(tmp_path):
    (tmp_path / "other.py").write_text("def run(ctx): pass\n")
    _one_line_error(tmp_path, "has no protocol.py")


def test_protocol_py_may_not_be_a_symlink(tmp_path):
    real = tmp_path / "elsewhere.py"
    real.write_text("def run(ctx):\n    return 1\n")
    proto = tmp_path / "proto"
    proto.mkdir()
    (proto / "protocol.py").symlink_to(real)
    _one_line_error(proto, "must be a regular file")


def test_protocol_py_may_not_be_a_directory(tmp_path):
    (tmp_path / "protocol.py").mkdir()
    _one_line_error(tmp_path, "must be a regular file")


def test_syntax_error_names_the_line(make_protocol):
    proto = make_protocol("x = 1\ndef run(ctx)\n    return 1\n")
    _one_line_error(proto, r"does not parse: .* \(line 2\)$")


def test_null_bytes_do_not_parse(make_protocol):
    proto = make_protocol("")
    (proto / "protocol.py").write_bytes(b"def run(ctx):\n    return 1\0\n")
    _one_line_error(proto, "does not parse")


def test_parsing_runs_nothing(make_protocol, tmp_path):
    marker = tmp_path / "ran"
    proto = make_protocol(f"open({str(marker)!r}, 'w').close()\ndef run(ctx):\n    return 1\n")
    check_protocol_dir(proto)
    assert not marker.exists()


def test_protocol_py_over_the_entry_limit(make_protocol, monkeypatch):
    monkeypatch.setattr(executor.task.bundle, "MAX_ENTRY_BYTES", 64)
    proto = make_protocol("def run(ctx):\n    return 1\n" + "# padding\n" * 10)
    _one_line_error(proto, "the limit is 64")


@pytest.mark.parametrize(
    "source",
    [
        "def other(ctx):\n    return 1\n",
        "class Protocol:\n    def run(self, ctx):\n        return 1\n",
        "def outer():\n    def run(ctx):\n        return 1\n    return run\n",
        "if True:\n    def run(ctx):\n        return 1\n",
        "running = 1\nrun_ = 2\n",
        "",
    ],
    ids=["other-name", "method", "nested-function", "conditional", "similar-names", "empty"],
)
def test_no_top_level_run(make_protocol, source):
    _one_line_error(make_protocol(source), "defines no top-level run")


@pytest.mark.parametrize(
    "source",
    [
        "def run(ctx):\n    return 1\n",
        "async def run(ctx):\n    return 1\n",
        "def _impl(ctx):\n    return 1\nrun = _impl\n",
        "run = lambda ctx: 1\n",
        "from helpers import train as run\n",
        "import helpers\nfrom helpers import run\n",
    ],
    ids=["def", "async-def", "assignment", "lambda", "import-as", "from-import"],
)
def test_forms_that_define_run(make_protocol, source):
    check_protocol_dir(make_protocol(source))


def test_annotated_assignment_defines_run(make_protocol):
    check_protocol_dir(make_protocol("def _impl(ctx):\n    return 1\nrun: object = _impl\n"))


# -- copy_bundle ---------------------------------------------------------------


def test_copy_is_faithful_and_read_only(make_protocol, tmp_path):
    proto = make_protocol(
        files={"helpers/__init__.py": "", "helpers/model.py": "W = [1, 2]\n", "weights.bin": b"\0\1\2" * 100}
    )
    dest = tmp_path / "bundle"
    bundle = copy_bundle(proto, dest)
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert copied == ["helpers/__init__.py", "helpers/model.py", "protocol.py", "weights.bin"]
    for rel in copied:
        assert (dest / rel).read_bytes() == (proto / rel).read_bytes()
        assert stat.S_IMODE((dest / rel).stat().st_mode) == 0o444
    for d in (dest, dest / "helpers"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o555
    assert bundle.path == dest
    assert bundle.files == 4
    assert bundle.size == sum((proto / rel).stat().st_size for rel in copied)


def test_caches_are_not_copied(make_protocol, tmp_path):
    proto = make_protocol(
        files={
            "__pycache__/protocol.cpython-311.pyc": b"stale bytecode",
            "helpers/__pycache__/x.pyc": b"more",
            ".git/config": "[core]\n",
            "helpers/util.py": "X = 1\n",
        }
    )
    bundle = copy_bundle(proto, tmp_path / "bundle")
    names = {p.name for p in bundle.path.rglob("*")}
    assert "__pycache__" not in names
    assert ".git" not in names
    assert bundle.files == 2


def test_destination_must_not_exist(make_protocol, tmp_path):
    dest = tmp_path / "bundle"
    dest.mkdir()
    with pytest.raises(FileExistsError):
        copy_bundle(make_protocol(), dest)


@pytest.mark.parametrize(
    ("link", "target_kind"),
    [
        ("passwd", "file"),
        ("helpers/passwd", "file"),
        ("helpers/etc", "dir"),
        ("etc", "dir"),
        ("helpers/dangling", "missing"),
    ],
)
def test_symlinks_anywhere_are_refused(make_protocol, tmp_path, link, target_kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret\n")
    target = {"file": outside / "secret", "dir": outside, "missing": outside / "gone"}[target_kind]
    proto = make_protocol(files={"helpers/__init__.py": ""})
    (proto / link).symlink_to(target)
    dest = tmp_path / "bundle"
    with pytest.raises(ProtocolBundleError, match=link) as info:
        copy_bundle(proto, dest)
    assert "\n" not in str(info.value)
    assert not any(p.read_bytes() == b"secret\n" for p in dest.rglob("*") if p.is_file())


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_blocking(make_protocol, tmp_path):
    proto = make_protocol(files={"data/readme.txt": "hi\n"})
    os.mkfifo(proto / "data" / "pipe")
    with pytest.raises(ProtocolBundleError, match="only regular files, not data/pipe"):
        copy_bundle(proto, tmp_path / "bundle")


def test_unix_socket_is_refused(make_protocol, tmp_path):
    import socket

    proto = make_protocol()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(proto / "s"))
        with pytest.raises(ProtocolBundleError, match="only regular files"):
            copy_bundle(proto, tmp_path / "bundle")
    finally:
        sock.close()


def test_size_limit(make_protocol, tmp_path, monkeypatch):
    proto = make_protocol("def run(ctx):\n    return 1\n", files={"data.bin": b"x" * 200})
    total = sum(p.stat().st_size for p in proto.rglob("*") if p.is_file())
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_BYTES", total)
    assert copy_bundle(proto, tmp_path / "at-limit").size == total
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_BYTES", total - 1)
    with pytest.raises(ProtocolBundleError, match=f"exceeds {total - 1} bytes"):
        copy_bundle(proto, tmp_path / "over-limit")


def test_file_count_limit(make_protocol, tmp_path, monkeypatch):
    proto = make_protocol(files={"a.py": "", "b.py": ""})
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_FILES", 3)
    assert copy_bundle(proto, tmp_path / "at-limit").files == 3
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_FILES", 2)
    with pytest.raises(ProtocolBundleError, match="more than 2 files"):
        copy_bundle(proto, tmp_path / "over-limit")


def test_the_entry_point_is_parsed_once_per_task_by_the_check_not_again_by_the_copy(tmp_path, monkeypatch):
    # The runner checks the protocol before anything is made for the task;
    # the copy parsed protocol.py a second time. Made to fail by calling
    # check_protocol_dir from copy_bundle again.
    proto = tmp_path / "proto"
    proto.mkdir()
    (proto / "protocol.py").write_text("def run(ctx):\n    return 1\n")
    parses: list[object] = []
    real_parse = ast.parse

    def counted_parse(*args, **kwargs):
        parses.append(args[0])
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(ast, "parse", counted_parse)
    check_protocol_dir(proto)
    copy_bundle(proto, tmp_path / "bundle")
    assert len(parses) == 1


# -- digest ---------------------------------------------------------------------


def _digest(make_protocol, tmp_path, files, source="def run(ctx):\n    return 1\n", extra=None):
    proto = make_protocol(source, files=files)
    if extra:
        extra(proto)
    dest = tmp_path / f"bundle-{proto.name}"
    return copy_bundle(proto, dest).sha256


def test_digest_is_stable_for_the_same_content(make_protocol, tmp_path):
    files = {"helpers/model.py": "W = 1\n", "data.bin": b"\1\2\3"}
    first = _digest(make_protocol, tmp_path, files)

    # Another directory, other mtimes, and a bytecode cache: same digest.
    def age(proto):
        for path in [proto, *proto.rglob("*")]:
            os.utime(path, (1_000_000, 1_000_000), follow_symlinks=False)

    second = _digest(
        make_protocol,
        tmp_path,
        {**files, "__pycache__/protocol.cpython-311.pyc": b"cache"},
        extra=age,
    )
    assert first == second
    assert len(first) == 64


@pytest.mark.parametrize(
    "files",
    [
        {"helpers/model.py": "W = 2\n", "data.bin": b"\1\2\3"},  # one byte of content
        {"helpers/model2.py": "W = 1\n", "data.bin": b"\1\2\3"},  # a renamed file
        {"helpers/model.py": "W = 1\n", "data.bin": b"\1\2\3", "new.py": ""},  # an added empty file
        {"helpers/model.py": "W = 1\n"},  # a removed file
        {"helpers/model.py": "W = 1\n", "sub/data.bin": b"\1\2\3"},  # a moved file
    ],
)
def test_digest_changes_with_content_or_layout(make_protocol, tmp_path, files):
    reference = _digest(make_protocol, tmp_path, {"helpers/model.py": "W = 1\n", "data.bin": b"\1\2\3"})
    assert _digest(make_protocol, tmp_path, files) != reference


def test_digest_tells_swapped_contents_apart(make_protocol, tmp_path):
    a = _digest(make_protocol, tmp_path, {"a.py": "1", "b.py": "2"})
    b = _digest(make_protocol, tmp_path, {"a.py": "2", "b.py": "1"})
    c = _digest(make_protocol, tmp_path, {"a.py": "12", "b.py": ""})
    assert len({a, b, c}) == 3


# -- links and races: what the copy opens is what was checked -------------------------


def _secret(tmp_path):
    """A file only its owner may read, outside the protocol directory."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret"
    secret.write_bytes(b"root-only secret\n")
    secret.chmod(0o600)
    return secret


def _copied_bytes(dest):
    return [p.read_bytes() for p in dest.rglob("*") if p.is_file()]


def test_hard_link_to_a_private_file_is_refused(make_protocol, tmp_path):
    secret = _secret(tmp_path)
    proto = make_protocol(files={"helpers/__init__.py": ""})
    os.link(secret, proto / "helpers" / "notes.txt")
    dest = tmp_path / "bundle"
    with pytest.raises(ProtocolBundleError, match=r"hard-linked files: helpers/notes\.txt"):
        copy_bundle(proto, dest)
    assert b"root-only secret\n" not in _copied_bytes(dest)


def _after_check(monkeypatch, target, action, *, on_fstat=False):
    """Run ``action`` once, just after the copier checks ``target``.

    The check is a stat that does not follow links (by path or relative to a
    directory descriptor), or with ``on_fstat`` an ``fstat`` of a descriptor open
    on ``target``: the window an attacker in the protocol directory races for.
    """
    real_stat, real_fstat = os.stat, os.fstat
    fired = False

    def names_target(path, dir_fd):
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        return os.path.abspath(os.path.join(base, os.fspath(path))) == str(target)

    def fire():
        nonlocal fired
        if not fired:
            fired = True
            action()

    def fake_stat(path, *args, dir_fd=None, follow_symlinks=True):
        result = real_stat(path, *args, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
        if not on_fstat and not follow_symlinks and not isinstance(path, int) and names_target(path, dir_fd):
            fire()
        return result

    def fake_lstat(path, *, dir_fd=None):
        return fake_stat(path, dir_fd=dir_fd, follow_symlinks=False)

    def fake_fstat(fd):
        result = real_fstat(fd)
        if on_fstat and os.readlink(f"/proc/self/fd/{fd}") == str(target):
            fire()
        return result

    monkeypatch.setattr(os, "stat", fake_stat)
    monkeypatch.setattr(os, "lstat", fake_lstat)
    monkeypatch.setattr(os, "fstat", fake_fstat)
    return lambda: fired


def _replace_with(path, make):
    """Atomically put what ``make(tmp)`` creates at ``path``, as an attacker would."""
    tmp = path.parent.parent / f".swap-{path.name}"
    make(tmp)
    os.replace(tmp, path)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("swap_to", ["private file", "/dev/zero", "fifo"])
def test_a_file_swapped_after_its_check_is_refused(make_protocol, tmp_path, monkeypatch, swap_to):
    secret = _secret(tmp_path)
    proto = make_protocol(files={"helpers/__init__.py": "", "helpers/model.py": "W = 1\n"})
    target = proto / "helpers" / "model.py"
    makers = {
        "private file": lambda tmp: tmp.symlink_to(secret),
        "/dev/zero": lambda tmp: tmp.symlink_to("/dev/zero"),
        "fifo": lambda tmp: os.mkfifo(tmp),
    }
    cap = sum(p.stat().st_size for p in proto.rglob("*") if p.is_file()) + 100
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_BYTES", cap)
    fired = _after_check(monkeypatch, target, lambda: _replace_with(target, makers[swap_to]))
    dest = tmp_path / "bundle"
    with pytest.raises(ProtocolBundleError, match=r"helpers/model\.py"):
        copy_bundle(proto, dest)
    assert fired()
    copied = _copied_bytes(dest)
    assert b"root-only secret\n" not in copied
    assert sum(map(len, copied)) <= cap


def test_a_directory_swapped_for_a_symlink_after_its_check_is_refused(make_protocol, tmp_path, monkeypatch):
    secret = _secret(tmp_path)
    (secret.parent / "model.py").write_bytes(secret.read_bytes())
    proto = make_protocol(files={"helpers/__init__.py": ""})
    helpers = proto / "helpers"

    def swap():
        helpers.rename(tmp_path / "moved-helpers")
        helpers.symlink_to(secret.parent)

    fired = _after_check(monkeypatch, helpers, swap)
    dest = tmp_path / "bundle"
    with pytest.raises(ProtocolBundleError, match="helpers"):
        copy_bundle(proto, dest)
    assert fired()
    assert b"root-only secret\n" not in _copied_bytes(dest)


@pytest.mark.parametrize("on_fstat", [False, True], ids=["after-check", "after-open"])
def test_a_file_that_grows_during_the_copy_stays_within_the_cap(
    make_protocol, tmp_path, monkeypatch, on_fstat
):
    proto = make_protocol(files={"data.bin": b"x" * 100})
    target = proto / "data.bin"
    cap = sum(p.stat().st_size for p in proto.rglob("*") if p.is_file())
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_BYTES", cap)

    def grow():
        with open(target, "ab") as f:
            f.write(b"y" * (1024 * 1024))

    fired = _after_check(monkeypatch, target, grow, on_fstat=on_fstat)
    dest = tmp_path / "bundle"
    with pytest.raises(ProtocolBundleError, match=r"exceeds|data\.bin grew"):
        copy_bundle(proto, dest)
    assert fired()
    assert sum(map(len, _copied_bytes(dest))) <= cap


def test_nesting_depth_and_directory_count_are_capped(make_protocol, tmp_path, monkeypatch):
    proto = make_protocol(files={"a/b/c/x.py": ""})
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_DEPTH", 3)
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_DIRS", 3)
    assert copy_bundle(proto, tmp_path / "at-limit").files == 2
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_DEPTH", 2)
    with pytest.raises(ProtocolBundleError, match="deeper than 2"):
        copy_bundle(proto, tmp_path / "too-deep")
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_DEPTH", 3)
    monkeypatch.setattr(executor.task.bundle, "MAX_BUNDLE_DIRS", 2)
    with pytest.raises(ProtocolBundleError, match="more than 2 directories"):
        copy_bundle(proto, tmp_path / "too-many")


def test_protocols_are_parsed_one_at_a_time_even_when_tasks_start_together(tmp_path, monkeypatch):
    # CPython 3.11 before 3.11.8 keeps the AST builder's recursion depth in
    # shared state: two threads in ast.parse at once can fail with
    # "SystemError: AST constructor recursion depth mismatch" (seen when two
    # tasks started in threads). Made to fail by removing the lock in
    # check_protocol_dir: the threads then overlap inside the parse.
    protocol = tmp_path / "p"
    protocol.mkdir()
    (protocol / "protocol.py").write_text("def run(ctx):\n    return 1\n")
    real_parse = ast.parse
    inside = 0
    most = 0
    count_lock = threading.Lock()

    def watched_parse(*args, **kwargs):
        nonlocal inside, most
        with count_lock:
            inside += 1
            most = max(most, inside)
        try:
            time.sleep(0.01)  # a parse long enough for another thread to arrive
            return real_parse(*args, **kwargs)
        finally:
            with count_lock:
                inside -= 1

    monkeypatch.setattr(ast, "parse", watched_parse)
    threads = [threading.Thread(target=check_protocol_dir, args=(protocol,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1
