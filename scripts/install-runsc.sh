#!/usr/bin/env bash
# Install gVisor's runsc from Debian and register it with the Docker engine.
#
# The registration passes --network=none (the sandbox has no network),
# --host-uds=open (it may connect to the parent's Unix socket) and
# --oci-seccomp (gVisor applies the container's seccomp profile; without it a
# policy's profile would be ignored, and the executor refuses such tasks).
#
# Idempotent: does nothing when the engine already knows a "runsc" runtime
# with those arguments; a registration that lacks one of them is upgraded in
# place, keeping its other arguments.
# Needs root (apt-get, /etc/docker/daemon.json, SIGHUP to dockerd).
set -euo pipefail

daemon_json="${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}"
required_args='["--network=none", "--host-uds=open", "--oci-seccomp"]'

# The runsc registration as the engine reports it, or nothing.
runsc_entry() {
  docker info --format '{{json .Runtimes}}' 2>/dev/null |
    python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin).get("runsc") or ""))' 2>/dev/null || true
}

# Whether the engine's runsc registration carries every required argument
# (the last --oci-seccomp[=value] decides, as Go's flag package does).
registered_complete() {
  runsc_entry | python3 -c '
import json, sys
entry = json.loads(sys.stdin.read() or "\"\"")
args = entry.get("runtimeArgs") or [] if isinstance(entry, dict) else None
if args is None:
    sys.exit(1)
seccomp = False
for arg in args:
    name, _, value = arg.lstrip("-").partition("=")
    if arg.startswith("-") and name == "oci-seccomp":
        seccomp = value in ("", "1", "t", "T", "true", "TRUE", "True")
sys.exit(0 if seccomp and "--network=none" in args and "--host-uds=open" in args else 1)
'
}

# Registered as required and its binary present: nothing to do. (A
# registration whose binary was removed survives a SIGHUP, so both are checked.)
if registered_complete && command -v runsc >/dev/null 2>&1; then
  echo "runsc: registered with the engine (--oci-seccomp on)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: runsc is not registered with the Docker engine with $required_args, and registering" \
       "it needs root; run 'sudo make runsc' once" >&2
  exit 1
fi
if ! command -v runsc >/dev/null 2>&1; then
  echo "runsc: installing Debian's runsc package"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >/dev/null
fi
runsc_path=$(command -v runsc)

# Merge the runtime into daemon.json, keeping every other setting and any
# other argument an existing registration has.
python3 - "$daemon_json" "$runsc_path" "$required_args" <<'PY'
import json, os, sys
path, runsc, required = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = {}
if os.path.exists(path):
    with open(path) as f:
        text = f.read().strip()
    config = json.loads(text) if text else {}
entry = config.setdefault("runtimes", {}).get("runsc") or {}
# Drop any --oci-seccomp=false (or other value) before adding the flag itself.
args = [a for a in entry.get("runtimeArgs") or [] if a.lstrip("-").partition("=")[0] != "oci-seccomp"]
args += [a for a in required if a not in args]
config["runtimes"]["runsc"] = {**entry, "path": runsc, "runtimeArgs": args}
os.makedirs(os.path.dirname(path), exist_ok=True)
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
os.replace(tmp, path)
PY

pid=$(pidof dockerd || true)
if [ -z "$pid" ]; then
  echo "error: dockerd is not running here; restart the engine to load $daemon_json" >&2
  exit 1
fi
kill -HUP $pid
for _ in $(seq 1 50); do
  if registered_complete; then
    echo "runsc: registered with the engine ($runsc_path, --oci-seccomp on)"
    exit 0
  fi
  sleep 0.2
done
echo "error: dockerd did not pick up the runsc runtime from $daemon_json" >&2
exit 1
