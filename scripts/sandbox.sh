#!/usr/bin/env bash
# Runs a command in a private network + mount namespace: its root netns has only `lo`, and
# /run/netns is a private tmpfs, so every netns, veth, bridge and rule the command creates is
# invisible to the host and disappears with it, even after a crash.
#   scripts/sandbox.sh <command> [args...]
set -euo pipefail
if [[ ${ZMESH_IN_SANDBOX:-} == 1 ]]; then exec "$@"; fi
mkdir -p /run/netns
exec unshare --mount --net --propagation private -- env ZMESH_IN_SANDBOX=1 bash -c '
  set -e
  mount -t tmpfs tmpfs /run/netns
  ip link set lo up
  exec "$@"' sandbox "$@"
