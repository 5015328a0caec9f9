#!/usr/bin/env bash
# Make sure the base image exists, building it offline from Debian packages if needed.
#
# Usage: images/base/build.sh IMAGE
#   IMAGE present locally      -> nothing to do.
#   IMAGE is the default name  -> debootstrap a minimal bookworm with python3 and
#                                 `docker import` it (about a minute; needs root).
#   any other IMAGE            -> `docker pull` it (only where a registry is reachable).
set -euo pipefail

image="${1:?usage: build.sh IMAGE}"
default_image="sandbox-executor/base:bookworm"
suite="${DEBIAN_SUITE:-bookworm}"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image: present"
  exit 0
fi
if [ "$image" != "$default_image" ]; then
  echo "base image $image: pulling"
  exec docker pull "$image"
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  else
    echo "error: debootstrap is needed to build $image offline; install it (apt-get install debootstrap) or set BASE_IMAGE" >&2
    exit 1
  fi
fi
if [ "$(id -u)" != 0 ]; then
  echo "error: debootstrap must run as root to build $image; run 'sudo make images' once or set BASE_IMAGE" >&2
  exit 1
fi

# Use the Debian mirror this machine's apt already uses; else debootstrap's default.
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "base image $image: debootstrap $suite (minbase + python3)${mirror:+ from $mirror}"
debootstrap --variant=minbase --include=python3 "$suite" "$root" ${mirror:+"$mirror"} >"$root.log" 2>&1 || {
  tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# Nothing the sandbox needs: package caches, docs, man pages, locales.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* \
       "$root"/usr/share/info/* "$root"/var/log/*
tar --numeric-owner -C "$root" -c . | docker import \
  --change 'CMD ["python3"]' \
  --change 'LABEL io.sandbox-executor.image=base' - "$image" >/dev/null
echo "base image $image: built"
