#!/usr/bin/env bash
# Runs zmesh on this machine: a local 2-node cluster made of network namespaces with the real
# istiod-lite, zmesh-cni and ztunnel processes, traffic between its pods, and what the mesh
# reported about it. Needs root. Everything it creates is uniquely named (`zmesh-<id>-*`
# namespaces, /run/zmesh/zmesh-<id>) and removed on exit; `zmesh down` cleans up after a crash.
#
#   scripts/demo.sh           # run the flows, print the evidence, tear down (zmesh up --once)
#   scripts/demo.sh --keep    # keep the mesh running until Ctrl-C (zmesh up)
#   scripts/demo.sh loopback  # the loopback CA + HBONE round trip without namespaces (zmesh demo)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
  echo "demo.sh: must run as root (it creates network namespaces)" >&2
  exit 1
fi
scripts/deps.sh
cargo build --locked -p zmesh -p ztunnel -p zmesh-cni -p istiod-lite
bin="${CARGO_TARGET_DIR:-target}/debug"
case "${1:-}" in
  --keep) shift; exec "$bin/zmesh" up "$@" ;;
  loopback) shift; exec "$bin/zmesh" demo "$@" ;;
  *) exec "$bin/zmesh" up --once "$@" ;;
esac
