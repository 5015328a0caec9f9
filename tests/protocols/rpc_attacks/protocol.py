"""Test protocol: attack the parent's gRPC surface from inside the sandbox.

Each attack is run as untrusted code would run it: with grpc and raw sockets
against /run/sandbox/sandbox.sock, on channels of its own (the runtime's own
channel is used only to check that normal calls still work). An attack returns
``(held, detail)``: ``held`` is true only if every status code (and, where the
parent gives one, its public message) is exactly the safe one. ``run``
returns ``{name: {"held": bool, "detail": str}}``.

Parameters (from the test): ``limits`` (the parent's caps as the tests pin
them, tests/rpc_caps.py, not as the code under test has them), ``victim_task_id`` (another task of the same
parent), ``host_run_dir`` (the parent's task directory base on the host) and
``connections`` (processes and connections per process for the connection
flood).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import grpc

from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

IPC = "/run/sandbox"
SOCKET = f"{IPC}/sandbox.sock"
BULK_SOCKET = f"{IPC}/bulk.sock"
# The bulk socket's wire format (executor/sandbox/contract.py), spelled out as an attacker would.
BULK_MAGIC = b"SE-BULK1"
TOKEN_FILE = f"{IPC}/token"
SERVICE = "/executor.v1.Sandbox/"
TOKEN_KEY = "x-sandbox-token"
MiB = 1024 * 1024
TIMEOUT_S = 15.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# Progress markers the test listens for (it samples the parent's open files and connections).
MARK_BEFORE = "rpc-attacks:connections-before"
MARK_HELD = "rpc-attacks:connections-held"
MARK_RELEASED = "rpc-attacks:connections-released"
MARK_START = "rpc-attacks:start"
# Sent before each attack, with its name after it: a hang then names what hung.
MARK_ATTACK = "rpc-attacks:attack "
# When an attack runs longer than STUCK_S, where its main thread is, for the test to show.
MARK_STUCK = "rpc-attacks:stuck "
STUCK_S = 90.0
# Around the raw rapid reset: the test samples the parent's CPU time at each.
MARK_CPU_START = "rpc-attacks:cpu-start"
MARK_CPU_END = "rpc-attacks:cpu-end"


def _mark(ctx, current, total=0, info=""):
    """A step the test's progress listener sees before this returns: the marks time its checks.

    Steps are coalesced (in the sandbox and in the parent), boundaries never,
    and a boundary sends the step waiting before it: a run_start right after
    the step delivers it at once, whatever came before.
    """
    ctx.progress.step(current, total, info=info)
    ctx.progress.run_start()


# Every RPC of the service, its streaming shape and a plausible request.
METHODS: dict[str, tuple[str, bytes]] = {
    "GetTask": ("unary_unary", pb.GetTaskRequest().SerializeToString()),
    "Heartbeat": ("stream_stream", pb.Beat(seq=1, progress_events=1).SerializeToString()),
    "SendMessage": (
        "stream_unary",
        pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=6, data=b"forged").SerializeToString(),
    ),
    "ReceiveMessage": (
        "unary_stream",
        pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=100).SerializeToString(),
    ),
    "OpenBulkSend": (
        "unary_unary",
        pb.BulkSendRequest(type=pb.TRAINING_UPDATE, total_size=10).SerializeToString(),
    ),
    "SendSecureShares": ("unary_unary", pb.SecureShares(shares={"pod-x": b"s"}).SerializeToString()),
    "GetSecureShares": ("unary_unary", pb.GetSecureSharesRequest(timeout_ms=100).SerializeToString()),
    "Report": (
        "unary_unary",
        pb.ReportRequest(
            files=pb.FileOutcomes(
                files=[pb.FileOutcome(name="sub/inner.csv", kind=pb.FileOutcome.FAILED, reason="forged")]
            )
        ).SerializeToString(),
    ),
    # If this were ever accepted the task would end with a forged result: loud, not silent.
    "Finish": ("unary_unary", pb.FinishRequest(status=pb.OK, result_json='"forged"').SerializeToString()),
}

Status = tuple[str, str]


def _channel() -> grpc.Channel:
    """A channel with a connection of its own (not shared with the runtime's channel)."""
    return grpc.insecure_channel(
        f"unix:{SOCKET}",
        options=[
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 0),
            ("grpc.enable_http_proxy", 0),
            ("grpc.max_receive_message_length", -1),
        ],
    )


def _status(call: Callable[[], Any]) -> Status:
    """The status name and details ``call`` ends with."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    except grpc.FutureTimeoutError:
        return "HUNG", "the client's future did not complete within its deadline"
    return "OK", ""


# grpc's client Channel.close() can block for good after many cancelled calls
# (seen after rapid_cancel, under runc and gVisor: the attacker kept beating,
# and the idle connection drew the server's "connection idle" GOAWAY).
# That is the sandbox's own client, not the parent, so it is noted, not waited on.
CLOSE_WAIT_S = 20.0
STUCK_CLOSES: list[grpc.Channel] = []  # kept referenced, so not collected mid-close


def _close(channel: grpc.Channel) -> None:
    """Close ``channel``, waiting at most CLOSE_WAIT_S for grpc's client to finish."""
    closer = threading.Thread(target=channel.close, daemon=True)
    closer.start()
    closer.join(CLOSE_WAIT_S)
    if closer.is_alive():
        STUCK_CLOSES.append(channel)


def _outcome(future: Any) -> Status:
    """How a call future ends; never waits much past the call's own deadline.

    A wait without a limit here once left the attacker blocked for good
    (beating all the while), so every wait in this protocol is bounded.
    """
    return _status(lambda: future.result(timeout=TIMEOUT_S + 15))


def _raw(
    channel: grpc.Channel, method: str, payload: bytes, metadata: Any, timeout: float = TIMEOUT_S
) -> Any:
    """Call ``method`` with raw request bytes (no client-side serialisation)."""
    shape = METHODS[method][0] if method in METHODS else "unary_unary"
    path = method if method.startswith("/") else SERVICE + method
    if shape == "unary_unary":
        return channel.unary_unary(path)(payload, metadata=metadata, timeout=timeout)
    if shape == "unary_stream":
        return list(channel.unary_stream(path)(payload, metadata=metadata, timeout=timeout))
    if shape == "stream_unary":
        return channel.stream_unary(path)(iter([payload]), metadata=metadata, timeout=timeout)
    return next(iter(channel.stream_stream(path)(iter([payload]), metadata=metadata, timeout=timeout)))


class Checks:
    """Expectations of one attack; ``result()`` is its ``(held, detail)``."""

    def __init__(self) -> None:
        self.count = 0
        self.failures: list[str] = []
        self.notes: list[str] = []

    def status(
        self, label: str, got: Status, code: str, message: str | None = None, contains: str = ""
    ) -> None:
        self.count += 1
        if got[0] != code or (message is not None and got[1] != message) or contains not in got[1]:
            want = f"{code} {message!r}" if message is not None else f"{code} containing {contains!r}"
            self.failures.append(f"{label}: got {got[0]} {got[1]!r}, expected {want}")

    def true(self, label: str, condition: bool, detail: str = "") -> None:
        self.count += 1
        if not condition:
            self.failures.append(f"{label}: {detail}" if detail else label)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def result(self) -> tuple[bool, str]:
        if self.failures:
            return False, "; ".join(self.failures)[:4000]
        text = f"all {self.count} checks held"
        if self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return self.count > 0, text[:4000]


class Attacker:
    """Shared state for the attacks: the token, stubs and the parent's limits."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        with open(TOKEN_FILE) as f:
            self.token = f.read().strip()
        self.md = ((TOKEN_KEY, self.token),)
        self.own = ctx.mailbox._client  # the runtime's own channel: only for "still works"
        self.limits: dict[str, Any] = ctx.parameters["limits"]
        self.victim = ctx.parameters["victim_task_id"]
        self.cpu: dict[str, float] = {}  # the sandbox's CPU seconds, per attack that measures it
        self.host_run_dir = ctx.parameters["host_run_dir"]

    def normal_calls_work(self, checks: Checks, label: str, channel: grpc.Channel | None = None) -> None:
        """GetTask and Report answer on ``channel``, a new channel and the runtime's own."""
        fresh = _channel()
        try:
            stubs = [("new channel", pb_grpc.SandboxStub(fresh)), ("runtime channel", self.own.stub)]
            if channel is not None:
                stubs.insert(0, ("same channel", pb_grpc.SandboxStub(channel)))
            for where, stub in stubs:
                got: Status = ("", "")
                for _ in range(20):  # a brief refusal right after a flood is fine; a dead server is not
                    got = _status(lambda s=stub: s.GetTask(pb.GetTaskRequest(), metadata=self.md, timeout=10))
                    if got[1] != "call rate limit exceeded":
                        break
                    time.sleep(0.1)
                checks.status(f"{label}: GetTask on the {where}", got, "OK")
                got = _status(
                    lambda s=stub: s.Report(
                        pb.ReportRequest(
                            progress=pb.ProgressEvent(kind=pb.ProgressEvent.STEP, info="still here")
                        ),
                        metadata=self.md,
                        timeout=10,
                    )
                )
                checks.status(f"{label}: Report on the {where}", got, "OK")
        finally:
            _close(fresh)


# -- authentication -----------------------------------------------------------


def _every_method_refused(a: Attacker, checks: Checks, label: str, metadata: Any) -> None:
    channel = _channel()
    try:
        for method, (_, payload) in METHODS.items():
            got = _status(lambda m=method, p=payload: _raw(channel, m, p, metadata))
            checks.status(f"{label} {method}", got, "UNAUTHENTICATED", "invalid or missing token")
    finally:
        _close(channel)


def attack_no_token(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    _every_method_refused(a, checks, "no metadata:", None)
    _every_method_refused(a, checks, "other metadata only:", (("x-other", a.token),))
    _every_method_refused(a, checks, "token under a -bin key:", ((TOKEN_KEY + "-bin", a.token.encode()),))
    checks.note(f"{len(METHODS)} methods x 3 ways")
    return checks.result()


def _flip(token: str, index: int) -> str:
    c = token[index]
    return token[:index] + ("A" if c != "A" else "B") + token[index + 1 :]


def attack_wrong_token_same_length(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    n = len(a.token)
    variants = {
        "first char changed": _flip(a.token, 0),
        "last char changed": _flip(a.token, n - 1),
        "middle char changed": _flip(a.token, n // 2),
        "all A": "A" * n,
        "reversed": a.token[::-1] if a.token[::-1] != a.token else _flip(a.token, 1),
    }
    for label, wrong in variants.items():
        assert len(wrong) == n
        assert wrong != a.token
        _every_method_refused(a, checks, f"{label}:", ((TOKEN_KEY, wrong),))
    return checks.result()


def attack_token_other_lengths(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    variants: dict[str, Any] = {
        "empty": ((TOKEN_KEY, ""),),
        "one char short": ((TOKEN_KEY, a.token[:-1]),),
        "one char long": ((TOKEN_KEY, a.token + "A"),),
        "prefix only": ((TOKEN_KEY, a.token[:8]),),
        "doubled": ((TOKEN_KEY, a.token * 2),),
        "trailing space": ((TOKEN_KEY, a.token + " "),),
        "wrong then right": ((TOKEN_KEY, "A" * len(a.token)), (TOKEN_KEY, a.token)),
    }
    for label, metadata in variants.items():
        _every_method_refused(a, checks, f"{label}:", metadata)
    return checks.result()


# -- identity -------------------------------------------------------------


def _sockets_anywhere() -> tuple[list[str], int]:
    """Every Unix socket in the sandbox's file tree (not /proc, /sys, /dev)."""
    found: list[str] = []
    seen = 0
    for root, dirs, files in os.walk("/", onerror=lambda e: None):
        if root == "/":
            dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
        for name in dirs + files:
            seen += 1
            path = os.path.join(root, name)
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    found.append(path)
            except OSError:
                pass
    return sorted(found), seen


def _mounted_task_dirs() -> set[str]:
    """Task directories (``t-...``) that any mount of this sandbox comes from."""
    dirs = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            for field in fields[3:5]:
                for m in re.finditer(r"/(t-[A-Za-z0-9_]+)(?:/|$)", field):
                    dirs.add(m.group(1))
    return dirs


def _unknown_fields(*values: str) -> bytes:
    """Unknown string fields 1, 15 and 99 carrying ``values``: identity smuggled in a body."""
    out = b""
    for number, value in zip((1, 15, 99), values, strict=False):
        data = value.encode()
        out += _varint((number << 3) | 2) + _varint(len(data)) + data
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def attack_other_task_identity(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    own_id = a.ctx.task_id
    listing = sorted(os.listdir(IPC))
    checks.true("/run/sandbox listing", listing == ["bulk.sock", "sandbox.sock", "token"], f"holds {listing}")
    sockets, seen = _sockets_anywhere()
    checks.true("sockets in the file tree", sockets == [BULK_SOCKET, SOCKET], f"found {sockets}")
    checks.note(f"walked {seen} paths, the only sockets are {BULK_SOCKET} and {SOCKET}")
    checks.true(
        "host run dir not visible", not os.path.exists(a.host_run_dir), f"{a.host_run_dir} exists inside"
    )
    task_dirs = _mounted_task_dirs()
    checks.true(
        "mounts come from at most one task directory", len(task_dirs) <= 1, f"mounts from {task_dirs}"
    )

    channel = _channel()
    try:
        smuggled = [
            ("plain", (), b""),
            ("x-task-id header", (("x-task-id", a.victim),), b""),
            ("task-id headers", (("task-id", a.victim), ("x-sandbox-task-id", a.victim)), b""),
            ("victim id in unknown body fields", (), _unknown_fields(a.victim, a.victim, a.victim)),
            (":authority-like header", (("x-forwarded-for", a.victim), ("x-task", a.victim)), b""),
        ]
        for label, extra, body in smuggled:
            try:
                raw = _raw(channel, "GetTask", body, a.md + extra)
                config = pb.TaskConfig()
                config.ParseFromString(raw)
                checks.true(
                    f"GetTask ({label}) returns this task",
                    config.task_id == own_id,
                    f"returned {config.task_id!r}, this task is {own_id!r}",
                )
            except grpc.RpcError as exc:
                checks.true(f"GetTask ({label})", False, f"{exc.code().name} {exc.details()!r}")
        # The test queued a MODELLER_RESPONSE for the victim task: it must stay out of reach.
        request = pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=500).SerializeToString()
        got = _status(
            lambda: _raw(
                channel,
                "ReceiveMessage",
                request + _unknown_fields(a.victim, a.victim),
                (*a.md, ("x-task-id", a.victim)),
            )
        )
        checks.status(
            "receive the victim's message",
            got,
            "DEADLINE_EXCEEDED",
            "no MODELLER_RESPONSE message within 0.5 s",
        )
        stub = pb_grpc.SandboxStub(channel)
        got = _status(
            lambda: stub.SendSecureShares(
                pb.SecureShares(shares={"victim-pod": b"x"}), metadata=a.md, timeout=TIMEOUT_S
            )
        )
        checks.status(
            "share to a pod outside the task", got, "RESOURCE_EXHAUSTED", "not peers of this task: victim-pod"
        )
    finally:
        _close(channel)
    return checks.result()


# -- size, rate and concurrency ----------------------------------------------


def attack_oversized_message(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    big = 32 * MiB
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    too_big = "Received message larger than max"
    try:
        got = _status(
            lambda: stub.Report(
                pb.ReportRequest(progress=pb.ProgressEvent(kind=pb.ProgressEvent.STEP, info="i" * big)),
                metadata=a.md,
                timeout=60,
            )
        )
        checks.status("32 MiB ProgressEvent.info", got, "RESOURCE_EXHAUSTED", contains=too_big)
        got = _status(
            lambda: stub.SendMessage(
                iter([pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=big, data=b"d" * big)]),
                metadata=a.md,
                timeout=60,
            )
        )
        checks.status("32 MiB first MessageChunk.data", got, "RESOURCE_EXHAUSTED", contains=too_big)

        def then_big() -> Iterator[pb.MessageChunk]:
            yield pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=big + 10, data=b"0123456789")
            yield pb.MessageChunk(data=b"d" * big)

        got = _status(lambda: stub.SendMessage(then_big(), metadata=a.md, timeout=60))
        checks.status("32 MiB second MessageChunk.data", got, "RESOURCE_EXHAUSTED", contains=too_big)
        got = _status(
            lambda: stub.Finish(
                pb.FinishRequest(status=42, result_json='"' + "r" * big + '"'), metadata=a.md, timeout=60
            )
        )
        checks.status("32 MiB FinishRequest", got, "RESOURCE_EXHAUSTED", contains=too_big)
        a.normal_calls_work(checks, "after oversize", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_flood(a: Attacker) -> tuple[bool, str]:
    """Calls as fast as four threads manage; admitted ones must stay within the task's rate cap.

    A runtime may be too slow to reach the cap at all (gVisor, a busy
    machine), so refusals are demanded only near it; tests/unit/test_service.py
    proves the limiter against a server with a cap low enough for any client.
    """
    checks = Checks()
    rate_per_s, rate_burst = float(a.limits["rate_per_s"]), int(a.limits["rate_burst"])
    threads, per_thread, batch, deadline_s = 4, 8000, 200, 30.0
    allowed = {
        ("RESOURCE_EXHAUSTED", "call rate limit exceeded"),
        ("RESOURCE_EXHAUSTED", "Concurrent RPC limit exceeded!"),
        # Flooded, the parent may not read some requests in time; it cancels
        # calls that wait past their grace once too many wait.
        ("CANCELLED", "CANCELLED"),
    }
    counts: dict[Status, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()

    def worker() -> None:
        channel = _channel()
        # Raw bytes (an empty GetTaskRequest) spare the client the protobuf work: a faster flood.
        get_task = channel.unary_unary(SERVICE + "GetTask")
        try:
            sent = 0
            while not stop.is_set() and sent < per_thread:
                futures = [get_task.future(b"", metadata=a.md, timeout=TIMEOUT_S) for _ in range(batch)]
                sent += batch
                for fut in futures:
                    got = _outcome(fut)
                    if got[0] == "UNAVAILABLE" and "RST_STREAM" in got[1]:
                        got = ("UNAVAILABLE", "stream refused (max_concurrent_streams)")
                    with lock:
                        counts[got] = counts.get(got, 0) + 1
                with lock:
                    if counts.get(("RESOURCE_EXHAUSTED", "call rate limit exceeded"), 0) >= 200:
                        stop.set()
                if time.monotonic() - started > deadline_s:
                    stop.set()
        finally:
            _close(channel)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(deadline_s + 30)
    elapsed = time.monotonic() - started
    total = sum(counts.values())
    limited = counts.get(("RESOURCE_EXHAUSTED", "call rate limit exceeded"), 0)
    checks.true(
        "flood bounded", total <= threads * per_thread and elapsed < deadline_s + 30, f"{total} calls"
    )
    # The invariant is that admitted calls never outrun the bucket (burst plus
    # rate x time). Whether refusals show up depends on how fast this runtime
    # can call at all: under gVisor a flood may not reach the cap.
    admitted = sum(v for k, v in counts.items() if k[0] == "OK")
    cap = rate_burst + rate_per_s * elapsed
    checks.true(
        "admitted calls within the rate cap",
        admitted <= cap,
        f"{admitted} calls admitted in {elapsed:.1f} s, more than the cap of {cap:.0f}",
    )
    if admitted >= cap * 0.9:
        checks.true("refusals at the cap", limited > 0, f"{admitted} admitted near the cap, none refused")
    allowed.add(("UNAVAILABLE", "stream refused (max_concurrent_streams)"))
    unexpected = {f"{k[0]} {k[1]!r}": v for k, v in counts.items() if k[0] != "OK" and k not in allowed}
    checks.true("only safe refusals", not unexpected, f"unexpected statuses {unexpected}")
    checks.note(
        f"{total} calls in {elapsed:.1f} s: "
        + ", ".join(f"{k[0]} {k[1]!r} x{v}" for k, v in sorted(counts.items()))
    )
    time.sleep(2.5)  # the bucket refills at its rate: 2.5 s fills any burst of up to 2500 calls
    a.normal_calls_work(checks, "after the flood")
    return checks.result()


def attack_rapid_cancel(a: Attacker) -> tuple[bool, str]:
    """Start calls and cancel them at once (HTTP/2 'rapid reset'); the server must stay up."""
    checks = Checks()
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    counts: dict[str, int] = {}
    try:
        for _ in range(5):
            futures = [
                stub.Report.future(
                    pb.ReportRequest(progress=pb.ProgressEvent(kind=pb.ProgressEvent.STEP)),
                    metadata=a.md,
                    timeout=TIMEOUT_S,
                )
                for _ in range(200)
            ]
            for fut in futures:
                fut.cancel()
            for fut in futures:
                if fut.cancelled():
                    code = "CANCELLED"
                else:
                    got = _outcome(fut)
                    refused_stream = got[0] == "UNAVAILABLE" and "RST_STREAM" in got[1]
                    code = "UNAVAILABLE (stream refused)" if refused_stream else f"{got[0]} {got[1]!r}"
                counts[code] = counts.get(code, 0) + 1
        safe = ("CANCELLED", "OK ''", "UNAVAILABLE (stream refused)")
        unexpected = {
            k: v for k, v in counts.items() if k not in safe and not k.startswith("RESOURCE_EXHAUSTED")
        }
        checks.true("only OK, CANCELLED, refused or RESOURCE_EXHAUSTED", not unexpected, f"{unexpected}")
        checks.note(", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        time.sleep(1.5)
        a.normal_calls_work(checks, "after 1000 cancelled calls")
    finally:
        _close(channel)
    return checks.result()


def _exchange(junk: bytes, wait_s: float) -> tuple[str, float]:
    """Send ``junk`` on a raw connection; how it ended (``closed`` or not) and when."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(wait_s)
    started = time.monotonic()
    try:
        s.connect(SOCKET)
        if junk:
            s.sendall(junk)
        while s.recv(65536):
            pass
        return "closed", time.monotonic() - started
    except (BrokenPipeError, ConnectionResetError):
        return "closed", time.monotonic() - started
    except TimeoutError:
        return "still open", time.monotonic() - started
    finally:
        s.close()


def attack_garbage_bytes(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    huge_frame = PREFACE + EMPTY_SETTINGS + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + os.urandom(1024)
    junks = {
        "HTTP/1.1 request": b"GET / HTTP/1.1\r\nHost: sandbox\r\nConnection: keep-alive\r\n\r\n",
        "8 KiB of random bytes": os.urandom(8192),
        "preface then random frames": PREFACE + os.urandom(4096),
        "frame longer than allowed": huge_frame,
        "TLS ClientHello-like": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(500),
    }
    # Connections that say nothing, or half a preface, must be closed by the
    # handshake timeout: run them meanwhile.
    silent: dict[str, tuple[str, float]] = {}

    def quiet(label: str, junk: bytes) -> None:
        silent[label] = _exchange(junk, 20.0)

    quiet_threads = [
        threading.Thread(target=quiet, args=(label, junk), daemon=True)
        for label, junk in (("silent connection", b""), ("half a preface", PREFACE[:10]))
    ]
    for t in quiet_threads:
        t.start()
    for label, junk in junks.items():
        how, took = _exchange(junk, 10.0)
        checks.true(f"{label}: closed by the server", how == "closed", f"{how} after {took:.1f} s")
    for t in quiet_threads:
        t.join(25)
    for label, (how, took) in sorted(silent.items()):
        checks.true(f"{label}: closed by the handshake timeout", how == "closed", f"{how} after {took:.1f} s")
        checks.note(f"{label} closed after {took:.1f} s")
    checks.true("both quiet connections finished", len(silent) == 2, f"{silent}")
    a.normal_calls_work(checks, "after garbage")
    return checks.result()


def attack_half_open_streams(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    cap = a.limits["send_message_open"]
    refused = f"at most {cap} SendMessage call(s) may be open at once"
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    gate = threading.Event()

    def first_chunk_then_nothing() -> Iterator[pb.MessageChunk]:
        yield pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=MiB, data=b"h" * 1024)
        gate.wait(120)

    futures = []
    try:
        for _ in range(cap + 3):
            fut = stub.SendMessage.future(first_chunk_then_nothing(), metadata=a.md, timeout=120)
            futures.append(fut)
            deadline = time.monotonic() + 1.0
            while not fut.done() and time.monotonic() < deadline:
                time.sleep(0.02)
        # A refusal may arrive late on a busy machine: give the ones beyond the cap time to end.
        deadline = time.monotonic() + 10.0
        while sum(f.done() for f in futures) < len(futures) - cap and time.monotonic() < deadline:
            time.sleep(0.05)
        still_open = [f for f in futures if not f.done()]
        ended = [_outcome(f) for f in futures if f.done()]
        checks.true(
            f"exactly {cap} half-open streams admitted", len(still_open) == cap, f"{len(still_open)} open"
        )
        for i, got in enumerate(ended):
            checks.status(f"stream beyond the cap #{i + 1}", got, "RESOURCE_EXHAUSTED", refused)
        a.normal_calls_work(checks, "while streams are half-open", channel)
    finally:
        for fut in futures:
            fut.cancel()
        gate.set()
    # The slots come back once the server sees the cancel: a SendMessage is admitted again.
    got: Status = ("", "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = _status(
            lambda: stub.SendMessage(
                iter([pb.MessageChunk(type=999, total_size=1, data=b"x")]), metadata=a.md, timeout=TIMEOUT_S
            )
        )
        if got[1] != refused:
            break
        time.sleep(0.2)
    checks.status(
        "SendMessage admitted again after cancelling",
        got,
        "INVALID_ARGUMENT",
        "a sandbox may not send <invalid> messages",
    )
    _close(channel)
    return checks.result()


def attack_pending_receives(a: Attacker) -> tuple[bool, str]:
    """More waiting receives than the cap: exactly the cap wait, the rest are refused."""
    checks = Checks()
    cap = a.limits["receive_message_open"]
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    waited = "no MODELLER_RESPONSE message within 3 s"
    refused = f"at most {cap} ReceiveMessage call(s) may be open at once"
    try:
        calls = []
        for _ in range(cap + 2):
            calls.append(
                stub.ReceiveMessage(
                    pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=3000),
                    metadata=a.md,
                    timeout=60,
                )
            )
            time.sleep(0.1)
        time.sleep(0.5)
        a.normal_calls_work(checks, "while receives wait", channel)
        # Which calls got in depends on arrival order, not on their index.
        ended = [_status(lambda c=call: list(c)) for call in calls]
        counts = {f"{code} {message!r}": ended.count((code, message)) for code, message in set(ended)}
        expected = {f"DEADLINE_EXCEEDED {waited!r}": cap, f"RESOURCE_EXHAUSTED {refused!r}": 2}
        checks.true(f"{cap} receives waited, 2 were refused", counts == expected, f"got {counts}")
        got = _status(
            lambda: list(
                stub.ReceiveMessage(
                    pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=100),
                    metadata=a.md,
                    timeout=TIMEOUT_S,
                )
            )
        )
        checks.status(
            "receive admitted again", got, "DEADLINE_EXCEEDED", "no MODELLER_RESPONSE message within 0.1 s"
        )
    finally:
        _close(channel)
    return checks.result()


def attack_second_heartbeat(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    cap = a.limits["heartbeat_open"]
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    forged = pb.Beat(seq=2**63, progress_events=2**64 - 1, mailbox_ops=2**64 - 1, main_thread_moved=True)
    try:
        for i in range(3):
            got = _status(
                lambda: next(iter(stub.Heartbeat(iter([forged]), metadata=a.md, timeout=TIMEOUT_S)))
            )
            checks.status(
                f"second Heartbeat #{i + 1}",
                got,
                "RESOURCE_EXHAUSTED",
                f"at most {cap} Heartbeat call(s) may be open at once",
            )
        a.normal_calls_work(checks, "after second heartbeats", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_huge_metadata(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    variants = {
        "one 64 KiB value": (*a.md, ("x-junk", "v" * 65536)),
        "token plus 64 KiB": ((TOKEN_KEY, a.token + "v" * 65536),),
        "64 KiB key name": (*a.md, ("x-" + "k" * 65536, "v")),
        "200 headers of 200 bytes": a.md + tuple((f"x-junk-{i}", "v" * 200) for i in range(200)),
    }
    try:
        for label, metadata in variants.items():
            got = _status(lambda m=metadata: stub.GetTask(pb.GetTaskRequest(), metadata=m, timeout=TIMEOUT_S))
            checks.status(
                label, got, "RESOURCE_EXHAUSTED", contains="received metadata size exceeds hard limit"
            )
        a.normal_calls_work(checks, "after huge metadata", channel)
    finally:
        _close(channel)
    return checks.result()


# -- validation ---------------------------------------------------------------


def attack_invalid_enums(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)

    def send(type_value: int) -> Status:
        return _status(
            lambda: stub.SendMessage(
                iter([pb.MessageChunk(type=type_value, total_size=1, data=b"x")]),
                metadata=a.md,
                timeout=TIMEOUT_S,
            )
        )

    def receive(type_value: int) -> Status:
        return _status(
            lambda: list(
                stub.ReceiveMessage(
                    pb.ReceiveMessageRequest(type=type_value, timeout_ms=100),
                    metadata=a.md,
                    timeout=TIMEOUT_S,
                )
            )
        )

    try:
        for value, name in ((999, "<invalid>"), (-5, "<invalid>"), (2**31 - 1, "<invalid>")):
            checks.status(
                f"SendMessage type {value}",
                send(value),
                "INVALID_ARGUMENT",
                f"a sandbox may not send {name} messages",
            )
            checks.status(
                f"ReceiveMessage type {value}",
                receive(value),
                "INVALID_ARGUMENT",
                f"a sandbox may not receive {name} messages",
            )
        for value in (pb.MESSAGE_TYPE_UNSPECIFIED, pb.ALGORITHM_EXCHANGE, pb.SECURE_SHARE):
            name = pb.MessageType.Name(value)
            checks.status(
                f"SendMessage {name}",
                send(value),
                "INVALID_ARGUMENT",
                f"a sandbox may not send {name} messages",
            )
        for value in (pb.TASK_ABORT, pb.TRAINING_UPDATE, pb.SECURE_SHARE):
            name = pb.MessageType.Name(value)
            checks.status(
                f"ReceiveMessage {name}",
                receive(value),
                "INVALID_ARGUMENT",
                f"a sandbox may not receive {name} messages",
            )
        for kind in (77, 0, -1):
            got = _status(
                lambda k=kind: stub.Report(
                    pb.ReportRequest(progress=pb.ProgressEvent(kind=k)), metadata=a.md, timeout=TIMEOUT_S
                )
            )
            checks.status(
                f"ProgressEvent.Kind {kind}", got, "INVALID_ARGUMENT", "unknown progress event kind"
            )
        for kind in (9, 0):
            got = _status(
                lambda k=kind: stub.Report(
                    pb.ReportRequest(
                        files=pb.FileOutcomes(files=[pb.FileOutcome(name="sub/inner.csv", kind=k)])
                    ),
                    metadata=a.md,
                    timeout=TIMEOUT_S,
                )
            )
            checks.status(
                f"FileOutcome.Kind {kind}",
                got,
                "INVALID_ARGUMENT",
                "file outcome must be PROCESSED or FAILED",
            )
        for status in (42, 0, -1):
            got = _status(
                lambda s=status: stub.Finish(
                    pb.FinishRequest(status=s, result_json='"forged"'), metadata=a.md, timeout=TIMEOUT_S
                )
            )
            checks.status(
                f"Finish status {status}", got, "INVALID_ARGUMENT", "status must be OK, ABORT or ERROR"
            )
    finally:
        _close(channel)
    return checks.result()


def attack_file_names(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    plain = "file name must be a plain relative path inside the datasource"
    bad = {
        "..": plain,
        "../records.csv": plain,
        "sub/../records.csv": plain,
        "/etc/passwd": plain,
        "/data/records.csv": plain,
        "./records.csv": plain,
        "records.csv/": plain,
        "sub//inner.csv": plain,
        "records.csv\0.txt": "file name is empty, too long or holds NUL",
        "\0": "file name is empty, too long or holds NUL",
        "": "file name is empty, too long or holds NUL",
        "n" * 1025: "file name is empty, too long or holds NUL",
        # The datasource's symlinks are never part of the task's view.
        "link.csv": "no such file in the datasource",
        "escape.csv": "no such file in the datasource",
        "linkdir/inner.csv": "no such file in the datasource",
        "missing.csv": "no such file in the datasource",
        "sub/missing.csv": "no such file in the datasource",
        "sub": "file name must name a regular file",
    }

    def report(*names: str) -> Status:
        return _status(
            lambda: stub.Report(
                pb.ReportRequest(
                    files=pb.FileOutcomes(
                        files=[
                            pb.FileOutcome(name=n, kind=pb.FileOutcome.FAILED, reason="bad") for n in names
                        ]
                    )
                ),
                metadata=a.md,
                timeout=TIMEOUT_S,
            )
        )

    try:
        for name, message in bad.items():
            checks.status(f"name {name[:40]!r}", report(name), "INVALID_ARGUMENT", message)
        # One bad name refuses the whole call: the good one in it is not recorded either.
        checks.status("good and bad together", report("sub/inner.csv", "../x"), "INVALID_ARGUMENT", plain)
        checks.status("a correct name", report("records.csv"), "OK")
        checks.status("a name in a subdirectory of the view", report("sub/inner.csv"), "OK")
        checks.true(
            "symlinks are not in the view",
            not any(os.path.lexists(f"/data/{n}") for n in ("link.csv", "escape.csv", "linkdir")),
            f"/data holds {sorted(os.listdir('/data'))}",
        )
    finally:
        _close(channel)
    return checks.result()


def attack_forged_body_size(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    chunk = a.limits["chunk_bytes"]
    limit = a.ctx.mailbox.max_message_bytes
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)

    def send(chunks: list[pb.MessageChunk] | Iterator[pb.MessageChunk]) -> Status:
        return _status(lambda: stub.SendMessage(iter(chunks), metadata=a.md, timeout=60))

    def lie(declared: int, sizes: list[int]) -> Iterator[pb.MessageChunk]:
        yield pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=declared, data=b"L" * sizes[0])
        for n in sizes[1:]:
            yield pb.MessageChunk(data=b"L" * n)

    try:
        checks.status(
            "declares 1 KiB, sends 3 MiB",
            send(lie(1024, [chunk, chunk, chunk])),
            "RESOURCE_EXHAUSTED",
            "message body is longer than its declared 1024 bytes",
        )
        checks.status(
            "declares 10 B, first chunk 1 MiB",
            send(lie(10, [chunk])),
            "RESOURCE_EXHAUSTED",
            "message body is longer than its declared 10 bytes",
        )
        checks.status(
            "declares 0, sends 1 B",
            send(lie(0, [1])),
            "RESOURCE_EXHAUSTED",
            "message body is longer than its declared 0 bytes",
        )
        checks.status(
            "declares 4 KiB, sends 10 B",
            send(lie(4096, [10])),
            "RESOURCE_EXHAUSTED",
            "message body is 10 bytes, not its declared 4096",
        )
        checks.status(
            "declares 2^64-1",
            send(lie(2**64 - 1, [10])),
            "RESOURCE_EXHAUSTED",
            f"outgoing message is {2**64 - 1} bytes; the limit is {limit}",
        )
        checks.status(
            "second chunk above the chunk size",
            send(lie(2 * chunk, [10, chunk + 1000])),
            "INVALID_ARGUMENT",
            f"chunks may be at most {chunk} bytes",
        )
        checks.status("no chunk at all", send([]), "INVALID_ARGUMENT", "empty message stream")
        a.normal_calls_work(checks, "after forged sizes", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_garbage_protobuf(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    channel = _channel()
    # ReportRequest{files{files{name: b"\xff\xfe"}}}
    bad_utf8_name = b"\x12\x06" + b"\x0a\x04" + b"\x0a\x02\xff\xfe"
    cases = [
        ("GetTask", "invalid tag", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
        ("Report", "truncated length-delimited field", b"\x32\x05ab"),
        ("Report", "random bytes", os.urandom(512)),
        ("Report", "invalid UTF-8 in a string", bad_utf8_name),
        ("Finish", "100k nested groups", b"\x0b" * 100_000),
        ("SendSecureShares", "wire type 7", b"\x0f\x00"),
        ("SendMessage", "random bytes on a stream", b"\x1a\xff\xff\xff\xff\x0f"),
    ]
    expected = ("INVALID_ARGUMENT", "malformed request")
    try:
        for method, label, payload in cases:
            got = _status(lambda m=method, p=payload: _raw(channel, m, p, a.md))
            checks.status(f"{method}: {label}", got, *expected)
        a.normal_calls_work(checks, "after garbage protobuf", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_garbage_protobuf_one_connection(a: Attacker) -> tuple[bool, str]:
    """Many unparsable requests on one connection: that connection must keep serving."""
    checks = Checks()
    channel = _channel()
    raw = channel.unary_unary(SERVICE + "Report")
    stub = pb_grpc.SandboxStub(channel)
    n = 30
    try:
        got = [_status(lambda: raw(b"\xff\xff\xff\xff", metadata=a.md, timeout=TIMEOUT_S)) for _ in range(n)]
        counts = {f"{c} {m!r}": got.count((c, m)) for c, m in set(got)}
        checks.true(
            f"{n} unparsable requests refused as such",
            counts == {"INVALID_ARGUMENT 'malformed request'": n},
            f"got {counts}",
        )
        time.sleep(1.0)
        after = _status(lambda: stub.GetTask(pb.GetTaskRequest(), metadata=a.md, timeout=TIMEOUT_S))
        checks.status("GetTask on the same connection afterwards", after, "OK")
        a.normal_calls_work(checks, "after unparsable requests")
    finally:
        _close(channel)
    return checks.result()


def attack_unknown_method(a: Attacker) -> tuple[bool, str]:
    checks = Checks()
    channel = _channel()
    methods = [
        "/executor.v1.Sandbox/DeleteEverything",
        "/executor.v1.Sandbox/gettask",
        "/executor.v1.Sandbox/",
        "/executor.v1.Sandbox/../Finish",
        "/executor.v2.Sandbox/GetTask",
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.channelz.v1.Channelz/GetServers",
    ]
    try:
        for method in methods:
            for label, metadata in (("with token", a.md), ("without token", None)):
                got = _status(lambda m=method, md=metadata: _raw(channel, m, b"", md))
                checks.status(f"{method} {label}", got, "UNIMPLEMENTED", "Method not found!")
        a.normal_calls_work(checks, "after unknown methods", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_field_limits(a: Attacker) -> tuple[bool, str]:
    """Counts, lengths and timeouts past their caps; Finish fields behind a valid status."""
    checks = Checks()
    lim = a.limits
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)

    def call(fn: Callable[..., Any], request: Any) -> Status:
        return _status(lambda: fn(request, metadata=a.md, timeout=TIMEOUT_S))

    def stream(fn: Callable[..., Any], request: Any) -> Status:
        return _status(lambda: list(fn(request, metadata=a.md, timeout=TIMEOUT_S)))

    max_timeout = f"timeout must be at most {lim['max_receive_timeout_s']:g} s"
    try:
        checks.status(
            "receive timeout 2^32-1 ms",
            stream(
                stub.ReceiveMessage, pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=2**32 - 1)
            ),
            "INVALID_ARGUMENT",
            max_timeout,
        )
        checks.status(
            "shares timeout 2^32-1 ms",
            call(stub.GetSecureShares, pb.GetSecureSharesRequest(timeout_ms=2**32 - 1)),
            "INVALID_ARGUMENT",
            max_timeout,
        )
        n = lim["max_shares"]
        checks.status(
            f"{n + 1} shares",
            call(stub.SendSecureShares, pb.SecureShares(shares={f"p{i}": b"s" for i in range(n + 1)})),
            "INVALID_ARGUMENT",
            f"expected 1 to {n} shares",
        )
        checks.status(
            "no shares",
            call(stub.SendSecureShares, pb.SecureShares()),
            "INVALID_ARGUMENT",
            f"expected 1 to {n} shares",
        )
        checks.status(
            "pod id with NUL",
            call(stub.SendSecureShares, pb.SecureShares(shares={"pod\0x": b"s"})),
            "INVALID_ARGUMENT",
            "invalid pod identifier",
        )
        size = lim["max_share_bytes"]
        checks.status(
            "oversized share",
            call(stub.SendSecureShares, pb.SecureShares(shares={"pod-x": b"s" * (size + 1)})),
            "INVALID_ARGUMENT",
            f"a share may be at most {size} bytes",
        )
        chars = lim["max_info_chars"]
        checks.status(
            "progress info too long",
            call(
                stub.Report,
                pb.ReportRequest(
                    progress=pb.ProgressEvent(kind=pb.ProgressEvent.STEP, info="i" * (chars + 1))
                ),
            ),
            "INVALID_ARGUMENT",
            f"progress info exceeds {chars} characters",
        )
        files = lim["max_files_per_call"]
        checks.status(
            f"{files + 1} file outcomes",
            call(
                stub.Report,
                pb.ReportRequest(
                    files=pb.FileOutcomes(
                        files=[pb.FileOutcome(name="sub/inner.csv", kind=pb.FileOutcome.PROCESSED)]
                        * (files + 1)
                    )
                ),
            ),
            "INVALID_ARGUMENT",
            f"expected 1 to {files} file outcomes",
        )
        checks.status(
            "no file outcomes",
            call(stub.Report, pb.ReportRequest(files=pb.FileOutcomes())),
            "INVALID_ARGUMENT",
            f"expected 1 to {files} file outcomes",
        )
        reason = lim["max_file_reason_chars"]
        checks.status(
            "file reason too long",
            call(
                stub.Report,
                pb.ReportRequest(
                    files=pb.FileOutcomes(
                        files=[
                            pb.FileOutcome(
                                name="sub/inner.csv", kind=pb.FileOutcome.FAILED, reason="r" * (reason + 1)
                            )
                        ]
                    )
                ),
            ),
            "INVALID_ARGUMENT",
            f"reason exceeds {reason} characters",
        )
        # A valid status, so that the other Finish fields are checked too: each one
        # is invalid, so the task does not end here (if it did, the test would see it).
        finish = [
            ("unknown timing", pb.FinishRequest(status=pb.OK, timings={"evil": 1.0}), "unknown timing names"),
            (
                "NaN timing",
                pb.FinishRequest(status=pb.OK, timings={"run": float("nan")}),
                "timings must be finite, non-negative seconds",
            ),
            (
                "NaN result",
                pb.FinishRequest(status=pb.OK, result_json="NaN"),
                "result_json is not valid JSON",
            ),
            (
                "not JSON",
                pb.FinishRequest(status=pb.OK, result_json="{'a': 1}"),
                "result_json is not valid JSON",
            ),
            (
                "deep JSON",
                pb.FinishRequest(status=pb.OK, result_json="[" * 100_000 + "]" * 100_000),
                "result_json is not valid JSON",
            ),
            (
                "long error type",
                pb.FinishRequest(status=pb.ERROR, error=pb.ErrorInfo(type="t" * 10_000)),
                "error type or message too long",
            ),
        ]
        for label, request, message in finish:
            checks.status(f"Finish {label}", call(stub.Finish, request), "INVALID_ARGUMENT", message)
        a.normal_calls_work(checks, "after field limits", channel)
    finally:
        _close(channel)
    return checks.result()


# -- work inside calls, raw HTTP/2, calls that never send their request -------


def attack_raw_rapid_reset(a: Attacker) -> tuple[bool, str]:
    """HEADERS then RST_STREAM, as fast as a raw socket allows; the parent must keep serving.

    The test compares the parent's CPU time over this attack with the
    sandbox's own (``cpu``, reported with the result).
    """
    import h2raw  # the bundle's directory is on the path inside the sandbox

    checks = Checks()
    streams = int(a.ctx.parameters.get("rapid_reset_streams", 300_000))
    cpu_before = time.process_time()
    _mark(a.ctx, 0, streams, info=MARK_CPU_START)
    outcome = h2raw.rapid_reset(SOCKET, a.token, streams)
    _mark(a.ctx, outcome.streams, streams, info=MARK_CPU_END)
    a.cpu["raw_rapid_reset"] = time.process_time() - cpu_before
    checks.true("the attack ran", outcome.streams > 0, f"{outcome}")
    checks.true(
        "the parent read every stream or ended the connection",
        outcome.caught_up or outcome.closed or outcome.goaway,
        f"{outcome}",
    )
    checks.note(f"{outcome.streams} streams in {outcome.seconds:.1f} s")
    checks.note(f"goaway={outcome.goaway} closed={outcome.closed}")
    time.sleep(2.5)  # the bucket refills
    a.normal_calls_work(checks, "after a raw rapid reset")
    return checks.result()


def attack_empty_chunks(a: Attacker) -> tuple[bool, str]:
    """A body declared large, then empty chunks: each costs the parent a message and moves nothing."""
    checks = Checks()
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    sent = 0

    def chunks() -> Iterator[pb.MessageChunk]:
        nonlocal sent
        yield pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=MiB, data=b"e" * 1024)
        for _ in range(200_000):
            sent += 1
            yield pb.MessageChunk()

    try:
        got = _status(lambda: stub.SendMessage(chunks(), metadata=a.md, timeout=60))
        checks.status(
            "empty chunks after the first", got, "INVALID_ARGUMENT", "only the first chunk may be empty"
        )
        checks.note(f"the client had produced {sent} empty chunks when the parent ended the stream")
        a.normal_calls_work(checks, "after empty chunks", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_file_flood(a: Attacker) -> tuple[bool, str]:
    """Calls of 1000 file outcomes each: the parent charges per file, not per call.

    As in :func:`attack_flood`, the invariant is that the files admitted never
    outrun the task's bucket (burst plus rate x time, counted in files); whether
    refusals show up depends on how fast this runtime can send at all (a busy
    machine under gVisor may not reach the cap), so they are demanded only near
    it. Charged per call, the first 400 calls would all pass within the burst.
    """
    checks = Checks()
    per_call = int(a.limits["max_files_per_call"])
    per_token = int(a.limits["files_per_token"])
    rate_per_s, rate_burst = float(a.limits["rate_per_s"]), int(a.limits["rate_burst"])
    threads, max_calls, deadline_s = 2, 400, 30.0
    payload = pb.ReportRequest(
        files=pb.FileOutcomes(
            files=[pb.FileOutcome(name="records.csv", kind=pb.FileOutcome.FAILED, reason="bad")] * per_call
        )
    ).SerializeToString()
    counts: dict[Status, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    started = time.monotonic()

    def worker() -> None:
        channel = _channel()
        # Raw bytes spare the client the protobuf work on every call: a faster flood.
        report = channel.unary_unary(SERVICE + "Report")
        try:
            while not stop.is_set():
                with lock:
                    if sum(counts.values()) >= max_calls:
                        break
                got = _status(lambda: report(payload, metadata=a.md, timeout=TIMEOUT_S))
                with lock:
                    counts[got] = counts.get(got, 0) + 1
                if got != ("OK", "") or time.monotonic() - started > deadline_s:
                    stop.set()
        finally:
            _close(channel)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(deadline_s + 2 * TIMEOUT_S)
    elapsed = time.monotonic() - started
    accepted = counts.get(("OK", ""), 0)
    limited = counts.get(("RESOURCE_EXHAUSTED", "call rate limit exceeded"), 0)
    unexpected = {
        k: v
        for k, v in counts.items()
        if k not in {("OK", ""), ("RESOURCE_EXHAUSTED", "call rate limit exceeded")}
    }
    checks.true("only the rate refusal", not unexpected, f"unexpected statuses {unexpected}")
    # Each admitted call cost per_call / per_token units of the bucket.
    admitted_units = accepted * per_call / per_token
    cap = rate_burst + rate_per_s * elapsed
    checks.true(
        "admitted files within the bucket",
        admitted_units <= cap,
        f"{accepted} calls of {per_call} files admitted in {elapsed:.1f} s: "
        f"{admitted_units:.0f} units, cap {cap:.0f}",
    )
    if admitted_units >= cap * 0.9:
        checks.true(
            "refused at the cap", limited > 0, f"{accepted} calls admitted near the cap, none refused"
        )
    checks.note(f"{accepted} calls of {per_call} files in {elapsed:.1f} s, then {counts}")
    time.sleep(2.5)
    a.normal_calls_work(checks, "after a file flood")
    return checks.result()


def attack_stalled_requests(a: Attacker) -> tuple[bool, str]:
    """Calls that send headers and never their request: the parent must end them, and still serve."""
    checks = Checks()
    gate = threading.Event()
    n = 14

    def headers_only() -> Iterator[bytes]:
        gate.wait(120)
        return
        yield b""

    channels = [_channel() for _ in range(2)]
    methods = ["GetTask", "Report", "SendSecureShares", "Finish"]
    futures = []
    try:
        for i in range(n):
            call = channels[i % 2].stream_unary(SERVICE + methods[i % len(methods)])
            futures.append(call.future(headers_only(), metadata=a.md, timeout=90))
        time.sleep(0.5)
        a.normal_calls_work(checks, f"while {n} calls withhold their request")
        ended = [_status(lambda f=f: f.result(timeout=60)) for f in futures]
        counts = {f"{c} {m!r}": ended.count((c, m)) for c, m in set(ended)}
        checks.true(
            f"the parent ended all {n} stalled calls",
            all(code == "CANCELLED" for code, _ in ended),
            f"got {counts}",
        )
    finally:
        gate.set()
        for channel in channels:
            _close(channel)
    return checks.result()


# -- the bulk socket ----------------------------------------------------------
#
# bulk.sock carries large mailbox bodies raw. A connection starts with
# BULK_MAGIC, one byte giving the token's length, the token and a 16-byte
# ticket from OpenBulkSend; the body follows, and the parent answers one
# status line. Its caps come from the test (``limits``), as pinned there.


def _bulk_header(token: str, ticket: bytes, magic: bytes = BULK_MAGIC) -> bytes:
    raw = token.encode()
    return magic + bytes([len(raw) & 0xFF]) + raw + ticket


def _bulk_connect(first: bytes = b"", close_write: bool = False) -> socket.socket:
    """A connection to the bulk socket that has sent ``first`` (and said no more, if asked)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT_S)
    try:
        s.connect(BULK_SOCKET)
        if first:
            s.sendall(first)
        if close_write:
            s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent closed it already: _bulk_end says so
    except BaseException:
        s.close()
        raise
    return s


def _bulk_end(s: socket.socket, wait_s: float = TIMEOUT_S) -> tuple[str, bytes, float]:
    """How the parent ended ``s`` (``closed`` or ``still open``), what it sent first, and when."""
    s.settimeout(wait_s)
    started = time.monotonic()
    got = b""
    try:
        while data := s.recv(65536):
            got += data[: 8192 - len(got)]
        return "closed", got, time.monotonic() - started
    except ConnectionResetError:  # closed with bytes of ours unread
        return "closed", got, time.monotonic() - started
    except TimeoutError:
        return "still open", got, time.monotonic() - started
    finally:
        s.close()


def _bulk_ticket(stub: Any, a: Attacker, size: int) -> bytes:
    return stub.OpenBulkSend(
        pb.BulkSendRequest(type=pb.TRAINING_UPDATE, total_size=size), metadata=a.md, timeout=TIMEOUT_S
    ).ticket


TABLE_FULL = "too many bulk transfers are open at once"


def _ticket_if_room(stub: Any, a: Attacker) -> bytes | None:
    """A 10-byte send ticket, or ``None`` while the parent's ticket table is full (a rate refusal waits)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            return _bulk_ticket(stub, a, 10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            if exc.details() == TABLE_FULL:
                return None
            time.sleep(0.02)


def _whole_table(stub: Any, a: Attacker) -> list[bytes]:
    """Every slot of the parent's ticket table, as 10-byte send tickets got as the slots free up.

    A ticket leaves the table when a connection presents it: once this has
    them all, the parent has read the header of every connection made with an
    earlier ticket and is serving it. That is what the attacker knows for
    certain, where a sleep only makes it likely. Fewer than the cap means not
    within ``TIMEOUT_S``. The caller spends them (:func:`_spend`).
    """
    cap = int(a.limits["bulk_max_tickets"])
    tickets: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(tickets) < cap and time.monotonic() < deadline:
        ticket = _ticket_if_room(stub, a)
        if ticket is None:
            time.sleep(0.02)
        else:
            tickets.append(ticket)
    return tickets


def _spend(checks: Checks, a: Attacker, label: str, tickets: list[bytes]) -> None:
    """Present each 10-byte ticket with no body: refused as short, nothing sent, its slot free again."""
    for i, ticket in enumerate(tickets):
        state, got, _ = _bulk_end(_bulk_connect(_bulk_header(a.token, ticket), close_write=True))
        checks.true(
            f"{label} {i + 1} spent", (state, got) == ("closed", _short(10)), f"{state} {got[:200]!r}"
        )


def _short(missing: int) -> bytes:
    """The status a body that ends ``missing`` bytes early gets: the parent held the transfer till then."""
    return f"INVALID_ARGUMENT the body ended {missing} bytes short of its size".encode()


def _refused_at_once(checks: Checks, label: str, how: tuple[str, bytes, float], within: float) -> None:
    state, got, took = how
    checks.true(f"{label}: closed", state == "closed", f"{state} after {took:.1f} s")
    checks.true(f"{label}: nothing sent back", got == b"", f"got {got[:80]!r}")
    checks.true(f"{label}: closed within {within:g} s", took < within, f"after {took:.1f} s")


def attack_bulk_bad_headers(a: Attacker) -> tuple[bool, str]:
    """No ticket, garbage, guessed tickets, a wrong token: nothing back, the connection closed."""
    checks = Checks()
    header_s = float(a.limits["bulk_header_timeout_s"])
    ticket_bytes = int(a.limits["bulk_ticket_bytes"])
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    # Connections that stop part-way must be ended by the header timeout: run them meanwhile.
    quiet: dict[str, tuple[str, bytes, float]] = {}

    def hold(label: str, first: bytes) -> None:
        quiet[label] = _bulk_end(_bulk_connect(first), header_s + 15.0)

    quiet_threads = [
        threading.Thread(target=hold, args=(label, first), daemon=True)
        for label, first in (
            ("silent connection", b""),
            ("magic only", BULK_MAGIC),
            ("token without a ticket", _bulk_header(a.token, b"")),
        )
    ]
    for t in quiet_threads:
        t.start()
    try:
        flipped = _flip(a.token, len(a.token) // 2)
        wrongs = {
            "no ticket, then end of input": _bulk_header(a.token, b""),
            "8 KiB of random bytes": os.urandom(8192),
            "an HTTP/2 preface": PREFACE + EMPTY_SETTINGS,
            "a wrong magic": _bulk_header(a.token, os.urandom(ticket_bytes), magic=b"SE-BULK2"),
            "a zero ticket": _bulk_header(a.token, bytes(ticket_bytes)),
            "token length 255": BULK_MAGIC + b"\xff" + a.token.encode() + bytes(ticket_bytes),
        }
        for i in range(20):
            wrongs[f"guessed ticket #{i + 1}"] = _bulk_header(a.token, os.urandom(ticket_bytes))
        for label, first in wrongs.items():
            _refused_at_once(checks, label, _bulk_end(_bulk_connect(first, close_write=True)), 5.0)
        # A real ticket with a wrong token (or none) is refused, and not used up by it.
        ticket = _bulk_ticket(stub, a, 10)
        for label, token in (
            ("a flipped token", flipped),
            ("no token", ""),
            ("the token twice", a.token * 2),
        ):
            how = _bulk_end(_bulk_connect(_bulk_header(token, ticket) + b"01234", close_write=True))
            _refused_at_once(checks, f"the real ticket with {label}", how, 5.0)
        state, got, _ = _bulk_end(_bulk_connect(_bulk_header(a.token, ticket) + b"01234", close_write=True))
        checks.true(
            "the real ticket still serves its owner after the refusals",
            (state, got) == ("closed", _short(5)),
            f"{state}, got {got[:200]!r}",
        )
        for t in quiet_threads:
            t.join(header_s + 20.0)
        checks.true("every quiet connection ended", len(quiet) == 3, f"{sorted(quiet)}")
        for label, (state, got, took) in sorted(quiet.items()):
            checks.true(
                f"{label}: closed by the header timeout",
                state == "closed" and got == b"" and took < header_s + 5.0,
                f"{state} after {took:.1f} s, got {got[:80]!r}",
            )
            checks.note(f"{label} closed after {took:.1f} s")
        a.normal_calls_work(checks, "after bad bulk headers", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_bulk_ticket_reuse(a: Attacker) -> tuple[bool, str]:
    """A ticket serves one connection: not a second one at once, nor after a send or a failure.

    The one send that completes here is the only message that may reach the
    modeller: the test checks that exactly one of its size arrived.
    """
    checks = Checks()
    size = int(a.ctx.parameters["bulk_reuse_size"])
    body = os.urandom(size)
    half = size // 2
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    try:
        ticket = _bulk_ticket(stub, a, size)
        first = _bulk_connect(_bulk_header(a.token, ticket) + body[:half])
        table = _whole_table(stub, a)
        checks.true(
            "the parent took the ticket from the first connection",
            len(table) == int(a.limits["bulk_max_tickets"]),
            f"{len(table)} tickets to be had within {TIMEOUT_S:g} s",
        )
        how = _bulk_end(_bulk_connect(_bulk_header(a.token, ticket) + body, close_write=True))
        _refused_at_once(checks, "the same ticket while its transfer runs", how, 5.0)
        try:
            first.sendall(body[half:])
            first.shutdown(socket.SHUT_WR)
        except OSError as exc:
            checks.true("the first transfer still open", False, f"{exc!r}")
        state, got, _ = _bulk_end(first)
        checks.true(
            "the first transfer completes", (state, got) == ("closed", b"OK"), f"{state} {got[:200]!r}"
        )
        for i in range(3):
            how = _bulk_end(_bulk_connect(_bulk_header(a.token, ticket) + body, close_write=True))
            _refused_at_once(checks, f"the ticket after its send, try {i + 1}", how, 5.0)
        _spend(checks, a, "table ticket", table)
        # A ticket whose transfer failed is spent too.
        failed = _bulk_ticket(stub, a, 10)
        state, got, _ = _bulk_end(_bulk_connect(_bulk_header(a.token, failed) + b"01", close_write=True))
        checks.true("a short transfer fails", (state, got) == ("closed", _short(8)), f"{state} {got[:200]!r}")
        how = _bulk_end(_bulk_connect(_bulk_header(a.token, failed) + b"0123456789", close_write=True))
        _refused_at_once(checks, "the ticket after its failed transfer", how, 5.0)
        a.normal_calls_work(checks, "after ticket reuse", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_bulk_open_limits(a: Attacker) -> tuple[bool, str]:
    """OpenBulkSend refuses what a send would, and more unused tickets than the cap."""
    checks = Checks()
    limit = a.ctx.mailbox.max_message_bytes
    cap = int(a.limits["bulk_max_tickets"])
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)

    def open_(message_type: int, size: int) -> Status:
        request = pb.BulkSendRequest(type=message_type, total_size=size)
        return _status(lambda: stub.OpenBulkSend(request, metadata=a.md, timeout=TIMEOUT_S))

    try:
        for size in (limit + 1, 2 * limit, 2**64 - 1):
            checks.status(
                f"announces {size} bytes",
                open_(pb.TRAINING_UPDATE, size),
                "RESOURCE_EXHAUSTED",
                f"outgoing message is {size} bytes; the limit is {limit}",
            )
        for value, name in (
            (pb.ALGORITHM_EXCHANGE, "ALGORITHM_EXCHANGE"),
            (pb.SECURE_SHARE, "SECURE_SHARE"),
            (pb.MESSAGE_TYPE_UNSPECIFIED, "MESSAGE_TYPE_UNSPECIFIED"),
            (999, "<invalid>"),
        ):
            checks.status(
                f"type {name}",
                open_(value, 10),
                "INVALID_ARGUMENT",
                f"a sandbox may not send {name} messages",
            )
        tickets = []
        for i in range(cap):
            try:
                tickets.append(_bulk_ticket(stub, a, 10))
            except grpc.RpcError as exc:
                checks.true(f"unused ticket {i + 1} of {cap}", False, f"{exc.code().name} {exc.details()!r}")
        checks.status(
            f"unused ticket {cap + 1}",
            open_(pb.TRAINING_UPDATE, 10),
            "RESOURCE_EXHAUSTED",
            TABLE_FULL,
        )
        # Spend them, so that the tickets' slots are free again.
        for i, ticket in enumerate(tickets):
            state, got, _ = _bulk_end(_bulk_connect(_bulk_header(a.token, ticket), close_write=True))
            checks.true(
                f"ticket {i + 1} spent", (state, got) == ("closed", _short(10)), f"{state} {got[:200]!r}"
            )
        try:
            again = _bulk_ticket(stub, a, 10)
            state, got, _ = _bulk_end(_bulk_connect(_bulk_header(a.token, again), close_write=True))
            checks.true("a ticket once they are spent", got == _short(10), f"{state} {got[:200]!r}")
        except grpc.RpcError as exc:
            checks.true("a ticket once they are spent", False, f"{exc.code().name} {exc.details()!r}")
        a.normal_calls_work(checks, "after bulk limits", channel)
    finally:
        _close(channel)
    return checks.result()


def _hold_transfers(a: Attacker, stub: Any, n: int) -> list[socket.socket]:
    """``n`` bulk sends of 10 bytes, each with 5 sent and the rest held back."""
    held = []
    try:
        for _ in range(n):
            held.append(_bulk_connect(_bulk_header(a.token, _bulk_ticket(stub, a, 10)) + b"01234"))
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


def _hold_served(a: Attacker, stub: Any, n: int) -> tuple[list[socket.socket], list[bytes]]:
    """Like :func:`_hold_transfers`, each connection retried until the parent serves it.

    A connection the parent has no room for yet (it has not seen the end of
    earlier ones) is closed at once, its ticket unused. With the ticket table
    full, a slot frees only when the parent takes a ticket: that tells a
    served connection from one still waiting, without a sleep. Returns the
    held connections and a table's worth of unused tickets, for the caller to
    spend (:func:`_spend`); a connection not served within ``TIMEOUT_S`` is
    held anyway, and the caller's checks show it.
    """
    tickets = _whole_table(stub, a)
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            ticket = tickets.pop()
            first = _bulk_header(a.token, ticket) + b"01234"
            s = _bulk_connect(first)
            deadline = time.monotonic() + TIMEOUT_S
            while (fresh := _ticket_if_room(stub, a)) is None and time.monotonic() < deadline:
                if select.select([s], [], [], 0.02)[0]:  # closed at once: try again
                    s.close()
                    s = _bulk_connect(first)
            held.append(s)
            if fresh is not None:
                tickets.append(fresh)
    except BaseException:
        for s in held:
            s.close()
        raise
    return held, tickets


def _release(checks: Checks, label: str, held: list[socket.socket]) -> None:
    """End each held transfer short: its status shows the parent was still serving it."""
    for i, s in enumerate(held):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        state, got, _ = _bulk_end(s)
        checks.true(
            f"{label} {i + 1}: still served", (state, got) == ("closed", _short(5)), f"{state} {got[:200]!r}"
        )


def attack_bulk_connection_flood(a: Attacker) -> tuple[bool, str]:
    """Bulk connections beyond the cap are closed at once; the ones within it, and gRPC, keep working."""
    checks = Checks()
    cap = int(a.limits["bulk_max_connections"])
    header_s = float(a.limits["bulk_header_timeout_s"])
    extra_n = 64
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    try:
        held = _hold_transfers(a, stub, cap)
        table = _whole_table(stub, a)
        checks.true(
            f"all {cap} held transfers are being served",
            len(table) == int(a.limits["bulk_max_tickets"]),
            f"{len(table)} tickets to be had within {TIMEOUT_S:g} s",
        )
        extras = []
        errors: list[str] = []
        for _ in range(extra_n):
            try:
                extras.append(_bulk_connect())
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        ends = [_bulk_end(s, header_s + 15.0) for s in extras]
        closed = [took for state, got, took in ends if state == "closed" and got == b""]
        checks.true(f"a real attempt: {extra_n} connects", len(extras) >= cap, f"{len(extras)}: {errors[:3]}")
        # Served, a silent connection would wait out the header timeout: these must not.
        checks.true(
            f"every connection beyond {cap} closed at once, with nothing sent",
            len(closed) == len(extras) and max(closed, default=0.0) < header_s / 2,
            f"{len(closed)} of {len(extras)} closed, the slowest after {max(closed, default=0.0):.1f} s",
        )
        checks.note(
            f"{len(closed)} of {extra_n} extra connections closed, the slowest after "
            f"{max(closed, default=0.0):.2f} s"
        )
        if errors:  # a full listen backlog refuses a connect outright: refused too
            checks.note(f"{len(errors)} connects refused: " + ", ".join(sorted(set(errors)))[:200])
        a.normal_calls_work(
            checks, f"while {cap} bulk transfers are held and {extra_n} more refused", channel
        )
        # Each slot is free once its status has been read.
        _release(checks, "held transfer", held)
        _spend(checks, a, "table ticket", table)
        _release(checks, "a transfer after the flood", _hold_transfers(a, stub, cap))
        a.normal_calls_work(checks, "after the bulk flood", channel)
    finally:
        _close(channel)
    return checks.result()


def attack_bulk_short_body(a: Attacker) -> tuple[bool, str]:
    """Fewer bytes than announced, then silence or a close: nothing is sent and the slot comes back.

    The parent ends a stalled transfer by its idle timeout (a minute; tests/unit/test_bulk.py
    shows it with a short one); here the sandbox closes the connection instead.
    """
    checks = Checks()
    cap = int(a.limits["bulk_max_connections"])
    size = 3 * MiB
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    try:
        # Said no more: the parent answers why.
        ticket = _bulk_ticket(stub, a, size)
        state, got, _ = _bulk_end(_bulk_connect(_bulk_header(a.token, ticket) + b"s" * MiB, close_write=True))
        checks.true(
            "a body that ends short", (state, got) == ("closed", _short(size - MiB)), f"{state} {got[:200]!r}"
        )
        # Silence: the parent waits, answers nothing, and everything else goes on.
        hung = [
            _bulk_connect(_bulk_header(a.token, _bulk_ticket(stub, a, size)) + b"s" * MiB) for _ in range(cap)
        ]
        ready = select.select(hung, [], [], 3.0)[0]
        checks.true("no answer to a body still arriving", not ready, f"{len(ready)} of {cap} answered")
        a.normal_calls_work(checks, f"while {cap} bulk sends hang short", channel)
        for s in hung:
            s.close()
        # Every slot comes back: as many transfers as the cap are served again.
        held, spare = _hold_served(a, stub, cap)
        _release(checks, "a transfer after the hung ones closed", held)
        _spend(checks, a, "spare ticket", spare)
        a.normal_calls_work(checks, "after short bulk bodies", channel)
    finally:
        _close(channel)
    return checks.result()


# -- connections and the limiter's bookkeeping --------------------------------

# One holder process: connect N times, send the HTTP/2 preface on each and keep
# every socket. After a pause it sorts them by what the parent did: answered
# with its SETTINGS and kept open (served), closed, or neither (silent: still
# in the listen backlog). It prints one JSON line, then holds all until stdin closes.
_HOLDER = r"""
import json, socket, sys, time
path, n, preface = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
socks, errors = [], []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        errors.append(f"{type(exc).__name__}: {exc}")
        if len(errors) >= 5:
            break
        continue
    try:
        s.sendall(preface)
    except OSError:
        pass  # the parent closed it at once: connected, not served
    socks.append(s)
time.sleep(2.0)
counts = {"served": 0, "closed": 0, "silent": 0, "not_http2": 0}
for s in socks:
    s.setblocking(False)
    got, ended = b"", False
    try:
        while True:
            data = s.recv(65536)
            if not data:
                ended = True
                break
            got += data
    except BlockingIOError:
        pass
    except OSError:
        ended = True
    if ended:
        counts["closed"] += 1
    elif not got:
        counts["silent"] += 1
    elif len(got) >= 9 and got[3] == 4:  # the first frame the parent sent is its SETTINGS
        counts["served"] += 1
    else:
        counts["not_http2"] += 1
print(json.dumps({"connected": len(socks), "errors": sorted(set(errors)), **counts}), flush=True)
sys.stdin.read()
"""


def attack_connection_flood(a: Attacker) -> tuple[bool, str]:
    """Many idle HTTP/2 connections from several processes: the parent serves at most its cap.

    The test also counts the parent's own connections of this task, in its
    process, before, while held and after: at most the cap, and back to the
    start after release.
    """
    import json

    checks = Checks()
    cap = int(a.limits["max_connections"])
    procs_n = int(a.ctx.parameters["connections"]["processes"])
    per_proc = int(a.ctx.parameters["connections"]["per_process"])
    _mark(a.ctx, 0, procs_n * per_proc, info=MARK_BEFORE)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, SOCKET, str(per_proc), (PREFACE + EMPTY_SETTINGS).hex()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(procs_n)
    ]
    totals = {"connected": 0, "served": 0, "closed": 0, "silent": 0, "not_http2": 0}
    errors: list[str] = []
    try:
        for p in procs:
            assert p.stdout is not None
            # Bounded: a holder stuck in connect() must not hang the attack.
            if not select.select([p.stdout], [], [], 120.0)[0]:
                errors.append("a holder said nothing within 120 s")
                continue
            line = p.stdout.readline()
            try:
                report = json.loads(line)
            except ValueError:
                errors.append(f"a holder said {line[:200]!r}")
                continue
            for key in totals:
                totals[key] += int(report[key])
            errors.extend(report["errors"])
        # The test samples the parent's connections while every connection is held.
        _mark(a.ctx, totals["served"], totals["connected"], info=MARK_HELD)
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(30)
    time.sleep(1.0)
    _mark(a.ctx, 0, totals["connected"], info=MARK_RELEASED)
    attempted = procs_n * per_proc
    checks.note(f"{procs_n} processes tried {attempted} connections: " + json.dumps(totals))
    if errors:
        checks.note("connect errors: " + ", ".join(sorted(set(errors)))[:300])
    checks.true(
        f"a real attempt: at least {4 * cap} connects succeeded",
        totals["connected"] >= 4 * cap,
        f"only {totals['connected']} of {attempted} connects succeeded: {sorted(set(errors))}"[:400],
    )
    checks.true(
        f"at most {cap} connections served at once",
        totals["served"] <= cap,
        f"the parent served {totals['served']} of {totals['connected']} connections from {procs_n} processes",
    )
    checks.true("the parent served the flood at all", totals["served"] >= 1, json.dumps(totals))
    checks.true("nothing but HTTP/2 came back", totals["not_http2"] == 0, json.dumps(totals))
    a.normal_calls_work(checks, "after the connection flood")
    return checks.result()


def attack_limiter_slot_leak(a: Attacker) -> tuple[bool, str]:
    """Calls refused before their handler runs must give their concurrency slot back.

    Run last: if the slots leak, this task cannot receive any more.
    """
    checks = Checks()
    cap = a.limits["receive_message_open"]
    channel = _channel()
    stub = pb_grpc.SandboxStub(channel)
    try:
        # 1. Requests too large to be read (RESOURCE_EXHAUSTED from gRPC itself).
        big = pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=100).SerializeToString()
        big += _varint((99 << 3) | 2) + _varint(2 * MiB) + b"z" * (2 * MiB)
        for i in range(cap + 1):
            got = _status(lambda: _raw(channel, "ReceiveMessage", big, a.md))
            checks.status(
                f"oversized receive request #{i + 1}", got, "RESOURCE_EXHAUSTED", contains="larger than max"
            )
        got = _status(
            lambda: list(
                stub.ReceiveMessage(
                    pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=100),
                    metadata=a.md,
                    timeout=TIMEOUT_S,
                )
            )
        )
        checks.status(
            "a normal receive afterwards is admitted",
            got,
            "DEADLINE_EXCEEDED",
            "no MODELLER_RESPONSE message within 0.1 s",
        )
        # 2. A request that does not parse (INTERNAL from gRPC itself).
        got = _status(lambda: _raw(channel, "GetSecureShares", b"\xff\xff\xff\xff", a.md))
        checks.status("garbage GetSecureShares", got, "INVALID_ARGUMENT", "malformed request")
        got = _status(
            lambda: stub.GetSecureShares(
                pb.GetSecureSharesRequest(timeout_ms=100), metadata=a.md, timeout=TIMEOUT_S
            )
        )
        # Admitted past the slot check into the session, which refuses: this
        # task's pod has no key for shares (the test gives it none).
        checks.status(
            "a normal GetSecureShares afterwards is admitted",
            got,
            "RESOURCE_EXHAUSTED",
            "this pod has no private key for secure shares",
        )
    finally:
        _close(channel)
    return checks.result()


ATTACKS: list[tuple[str, Callable[[Attacker], tuple[bool, str]]]] = [
    ("no_token", attack_no_token),
    ("wrong_token_same_length", attack_wrong_token_same_length),
    ("token_other_lengths", attack_token_other_lengths),
    ("other_task_identity", attack_other_task_identity),
    ("unknown_method", attack_unknown_method),
    ("invalid_enums", attack_invalid_enums),
    ("file_names", attack_file_names),
    ("field_limits", attack_field_limits),
    ("forged_body_size", attack_forged_body_size),
    ("garbage_protobuf", attack_garbage_protobuf),
    ("garbage_protobuf_one_connection", attack_garbage_protobuf_one_connection),
    ("oversized_message", attack_oversized_message),
    ("huge_metadata", attack_huge_metadata),
    ("second_heartbeat", attack_second_heartbeat),
    ("half_open_streams", attack_half_open_streams),
    ("pending_receives", attack_pending_receives),
    ("garbage_bytes", attack_garbage_bytes),
    ("flood", attack_flood),
    ("rapid_cancel", attack_rapid_cancel),
    ("raw_rapid_reset", attack_raw_rapid_reset),
    ("empty_chunks", attack_empty_chunks),
    ("file_flood", attack_file_flood),
    ("stalled_requests", attack_stalled_requests),
    ("bulk_bad_headers", attack_bulk_bad_headers),
    ("bulk_ticket_reuse", attack_bulk_ticket_reuse),
    ("bulk_open_limits", attack_bulk_open_limits),
    ("bulk_connection_flood", attack_bulk_connection_flood),
    ("bulk_short_body", attack_bulk_short_body),
    ("connection_flood", attack_connection_flood),
    ("limiter_slot_leak", attack_limiter_slot_leak),
]


def _report_if_stuck(ctx: Any, current: list[Any], done: threading.Event) -> None:
    """Report the main thread's stack once per attack that runs past STUCK_S."""
    main = threading.main_thread().ident
    reported = None
    while not done.wait(5.0):
        name, started = current[0], current[1]
        if name == reported or time.monotonic() - started < STUCK_S:
            continue
        reported = name
        frame = sys._current_frames().get(main or 0)
        where = (
            " <- ".join(f"{f.f_code.co_name}:{f.f_lineno}" for f in _frames(frame))
            if frame is not None
            else "?"
        )
        _mark(ctx, 0, info=(MARK_STUCK + f"{name} at {where}")[:1000])


def _frames(frame: Any) -> Iterator[Any]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def run(ctx: Any) -> dict[str, dict[str, Any]]:
    attacker = Attacker(ctx)
    _mark(ctx, 0, info=MARK_START)
    results: dict[str, dict[str, Any]] = {}
    current: list[Any] = ["", time.monotonic()]
    done = threading.Event()
    threading.Thread(target=_report_if_stuck, args=(ctx, current, done), daemon=True).start()
    for name, attack in ATTACKS:
        _mark(ctx, len(results), len(ATTACKS), info=MARK_ATTACK + name)
        current[:] = [name, time.monotonic()]
        started = time.monotonic()
        try:
            held, detail = attack(attacker)
        except Exception as exc:  # an attack that breaks is not a held attack
            held, detail = False, f"the attack itself failed: {exc!r} {traceback.format_exc()[-1500:]}"
        results[name] = {
            "held": bool(held),
            "detail": detail,
            "seconds": round(time.monotonic() - started, 2),
        }
        if name in attacker.cpu:
            results[name]["cpu"] = round(attacker.cpu[name], 3)
        if STUCK_CLOSES:
            results[name]["detail"] += f" (grpc client: channel.close() blocked {len(STUCK_CLOSES)}x)"
            STUCK_CLOSES.clear()
    done.set()
    return results
