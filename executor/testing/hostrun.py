"""The fake engine's program that runs the real init and child runtime as host processes, unconfined.

With it the server, session, lifeline and supervisor are driven for real
without Docker. Nothing here confines the protocol: use it only with trusted
test code.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from executor.backends import ContainerSpec, ExitInfo

if TYPE_CHECKING:
    from pathlib import Path

    from executor.testing.engine import FakeContainer, Program

# The child runtime on the host: the container's paths (protocol bundle,
# datasource, IPC directory) are mapped back to their host sources.
_HOST_RUNTIME = """\
import json, sys
from pathlib import Path
import executor.sandbox.runtime as runtime

mounts = json.loads(sys.argv[1])
runtime.SCRATCH_DIR = Path(sys.argv[2])


def host_path(path):
    for target, source in mounts.items():
        if path == target or path.startswith(target + "/"):
            return source + path[len(target):]
    return path


class HostContext(runtime.Context):
    def __init__(self, config, client, scratch_dir, **kwargs):
        config.protocol_path = host_path(config.protocol_path)
        config.data_path = host_path(config.data_path)
        super().__init__(config, client, scratch_dir, **kwargs)


runtime.Context = HostContext
sys.exit(runtime.main(sys.argv[3:]))
"""


# Interpreter flags for the image (no site-packages for init, no working
# directory on sys.path) that would hide the host's venv, where this package is.
_IMAGE_ONLY_FLAGS = frozenset({"-P", "-S"})


def host_command(spec: ContainerSpec, scratch_dir: Path) -> list[str]:
    """``spec.command`` as host processes: the real init and runtime, container paths mapped."""
    mounts = {m.target: str(m.source) for m in spec.mounts}

    def host_path(arg: str) -> str:
        for target, source in mounts.items():
            if arg == target or arg.startswith(target + "/"):
                return source + arg[len(target) :]
        return arg

    argv: list[str] = []
    args = iter(spec.command)
    for arg in args:
        if arg == "python3":
            argv.append(sys.executable)
        elif arg in _IMAGE_ONLY_FLAGS and argv and argv[-1] == sys.executable:
            continue
        elif arg == "-m" and argv and argv[-1] == sys.executable:
            module = next(args)
            if module == "executor.sandbox":
                argv += ["-c", _HOST_RUNTIME, json.dumps(mounts), str(scratch_dir)]
            else:
                argv += ["-m", module]
        else:
            argv.append(host_path(arg))
    return argv


def host_runtime(scratch_dir: Path, *, stderr_bytes: int = 16 * 1024) -> Program:
    """Run the container's command (our init, then the child runtime) as host processes.

    The server, session, lifeline and supervisor are then driven for real
    without Docker. A kill SIGKILLs the whole process group, as an engine
    kills a container; an exit by a signal is reported as ``128 + signal``.
    The processes' stdout and stderr are the container's output, written as
    they come (``follow_output`` yields them); ``stderr_tail`` keeps the last
    ``stderr_bytes`` characters. Nothing here confines the protocol: use it
    only with trusted test code.
    """

    def program(container: FakeContainer) -> ExitInfo:
        proc = subprocess.Popen(
            host_command(container.spec, scratch_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

        def kill_group() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        def pump(stream: str, fd: int) -> None:
            while chunk := os.read(fd, 64 * 1024):
                container.write(stream, chunk)

        assert proc.stdout is not None
        assert proc.stderr is not None
        readers = [
            threading.Thread(target=pump, args=(name, pipe.fileno()), daemon=True)
            for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))
        ]
        for reader in readers:
            reader.start()
        container.on_kill(kill_group)
        if container.wait_killed(0):  # killed before the process existed
            kill_group()
        for reader in readers:  # until end-of-file, as communicate() would
            reader.join()
        proc.stdout.close()
        proc.stderr.close()
        code = proc.wait()
        # The group may outlive its leader (a runtime init left behind).
        kill_group()
        container.stderr = container.stderr[-stderr_bytes:]
        return ExitInfo(128 - code if code < 0 else code)

    return program
