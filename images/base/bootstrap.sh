#!/usr/bin/env bash
# Build a minimal Debian root filesystem with debootstrap and `docker import` it as TAG.
# Used when no registry can give us debian:bookworm-slim (air-gapped hosts, CI without a registry).
# Usage: bootstrap.sh TAG SUITE MIRROR [LABEL=VALUE ...]
set -euo pipefail
tag=$1 suite=$2 mirror=$3
shift 3

if ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  else
    echo "bootstrap: debootstrap is needed to build a base image offline (apt-get install debootstrap)" >&2
    exit 1
  fi
fi

root=$(mktemp -d /var/tmp/sandbox-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase "$suite" "$root" "$mirror" >&2
# Trim what a container never uses; keeps the image close to bookworm-slim's size.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/* "$root"/usr/share/locale/*
changes=(--change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
for kv in "$@"; do changes+=(--change "LABEL $kv"); done
tar -C "$root" --numeric-owner -c . | docker import "${changes[@]}" - "$tag" >/dev/null
echo "$tag"
