#!/usr/bin/env bash
# Runs the zmesh demo on this machine (needs root for network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --locked -p zmesh
exec target/debug/zmesh demo "$@"
