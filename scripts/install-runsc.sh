#!/usr/bin/env bash
# Install gVisor's runsc from Debian and register it with the Docker engine.
#
# Idempotent: does nothing when the engine already knows a "runsc" runtime.
# Needs root (apt-get, /etc/docker/daemon.json, SIGHUP to dockerd).
set -euo pipefail

daemon_json="${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}"

has_runsc() { docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; }

# Registered and its binary present: nothing to do. (A registration whose
# binary was removed survives a SIGHUP, so both are checked.)
if has_runsc && command -v runsc >/dev/null 2>&1; then
  echo "runsc: registered with the engine"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: runsc is not registered with the Docker engine, and registering it needs root;" \
       "run 'sudo make runsc' once" >&2
  exit 1
fi
if ! command -v runsc >/dev/null 2>&1; then
  echo "runsc: installing Debian's runsc package"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq runsc >/dev/null
fi
runsc_path=$(command -v runsc)

# Merge the runtime into daemon.json, keeping every other setting.
python3 - "$daemon_json" "$runsc_path" <<'PY'
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
config = {}
if os.path.exists(path):
    with open(path) as f:
        text = f.read().strip()
    config = json.loads(text) if text else {}
config.setdefault("runtimes", {})["runsc"] = {
    # --network=none: the sandbox has no network; --host-uds=open: it may connect
    # to the parent's Unix socket in its bind-mounted task directory.
    "path": runsc,
    "runtimeArgs": ["--network=none", "--host-uds=open"],
}
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
  if has_runsc; then
    echo "runsc: registered with the engine ($runsc_path)"
    exit 0
  fi
  sleep 0.2
done
echo "error: dockerd did not pick up the runsc runtime from $daemon_json" >&2
exit 1
