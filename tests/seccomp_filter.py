"""A process's seccomp filters, read from the host and run over system calls.

Two profiles are compared by what their compiled filters decide, call by
call, not by their JSON: :func:`read_filters` takes the classic-BPF programs
the kernel holds for a process (``PTRACE_SECCOMP_GET_FILTER``, which needs
root), and :func:`decide` runs them on a ``struct seccomp_data`` as the
kernel would.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from pathlib import Path

HEADERS = Path("/usr/include/x86_64-linux-gnu/asm")
# seccomp_data.arch of each x86 ABI; x32 calls carry the x86-64 arch and a bit in the number.
AUDIT_ARCH = {"x86_64": 0xC000_003E, "x32": 0xC000_003E, "i386": 0x4000_0003}
X32_SYSCALL_BIT = 0x4000_0000
RET_ALLOW = 0x7FFF_0000
RET_ERRNO = 0x0005_0000
ACTION_MASK = 0xFFFF_0000
# Which action wins when several filters answer (the kernel's order).
_PRECEDENCE = (
    0x8000_0000,
    0x0000_0000,
    0x0003_0000,
    0x0005_0000,
    0x7FC0_0000,
    0x7FF0_0000,
    0x7FFC_0000,
    RET_ALLOW,
)

_PTRACE_ATTACH, _PTRACE_DETACH, _PTRACE_SECCOMP_GET_FILTER = 16, 17, 0x420C
_WALL = 0x4000_0000


def syscall_numbers(abi: str) -> dict[str, int]:
    """Name to number for ``abi`` (``x86_64``, ``x32``, ``i386``), from Debian's linux-libc-dev headers."""
    header = {"x86_64": "unistd_64.h", "x32": "unistd_x32.h", "i386": "unistd_32.h"}[abi]
    text = (HEADERS / header).read_text()
    out = {name: int(nr) for name, nr in re.findall(r"#define __NR_(\w+) (\d+)\b", text)}
    out.update(
        (name, X32_SYSCALL_BIT + int(nr))
        for name, nr in re.findall(r"#define __NR_(\w+) \(__X32_SYSCALL_BIT \+ (\d+)\)", text)
    )
    return out


def read_filters(pid: int) -> list[list[tuple[int, int, int, int]]]:
    """The seccomp programs of host process ``pid``, newest first (each a list of BPF instructions)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(_PTRACE_ATTACH, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"ptrace attach to {pid}")
    try:
        os.waitpid(pid, _WALL)
        programs = []
        for index in range(64):
            count = libc.ptrace(_PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(index), None)
            if count < 0:
                break
            buf = ctypes.create_string_buffer(count * 8)
            libc.ptrace(_PTRACE_SECCOMP_GET_FILTER, pid, ctypes.c_void_p(index), buf)
            programs.append([struct.unpack_from("<HBBI", buf.raw, i * 8) for i in range(count)])
        return programs
    finally:
        libc.ptrace(_PTRACE_DETACH, pid, None, None)


def _run(program: list[tuple[int, int, int, int]], data: bytes) -> int:
    a = x = 0
    mem = [0] * 16
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode = code & 0xE0
            a = struct.unpack_from("<I", data, k)[0] if mode == 0x20 else mem[k] if mode == 0x60 else k
        elif cls == 0x01:  # LDX
            x = mem[k] if code & 0xE0 == 0x60 else k
        elif cls == 0x02:  # ST
            mem[k] = a
        elif cls == 0x03:  # STX
            mem[k] = x
        elif cls == 0x04:  # ALU
            src = x if code & 0x08 else k
            ops = {0x00: a + src, 0x10: a - src, 0x40: a | src, 0x50: a & src, 0x60: a << src, 0x70: a >> src}
            a = ops[code & 0xF0] & 0xFFFF_FFFF
        elif cls == 0x05:  # JMP
            src = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x00:
                pc += k + 1
                continue
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}[op]
            pc += 1 + (jt if taken else jf)
            continue
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        else:  # MISC: TAX / TXA
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
        pc += 1


def decide(programs: list[list[tuple[int, int, int, int]]], abi: str, nr: int, args: tuple[int, ...]) -> int:
    """The filters' answer (``SECCOMP_RET_*`` with its data) to call ``nr`` of ``abi`` with ``args``."""
    data = struct.pack("<iIQ6Q", nr, AUDIT_ARCH[abi], 0, *(args + (0,) * (6 - len(args))))
    answers = [_run(p, data) for p in programs]
    return min(
        answers, key=lambda r: _PRECEDENCE.index(r & ACTION_MASK) if r & ACTION_MASK in _PRECEDENCE else 0
    )
