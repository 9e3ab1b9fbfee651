#!/usr/bin/env bash
# Installs what zmesh's demo and tests need on a Debian machine (run as root). Idempotent and quiet
# when everything is already present.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip || need+=(iproute2)
have iptables-restore || need+=(iptables)
have nft || need+=(nftables)
have unshare || need+=(util-linux)
have tcpdump || need+=(tcpdump)
have nc || need+=(netcat-openbsd)
have gcc || need+=(gcc)
have make || need+=(make)
have pkg-config || need+=(pkg-config)

if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "zmesh: missing packages ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "zmesh: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! have cargo; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "zmesh: add \$HOME/.cargo/bin to PATH" >&2
  else
    echo "zmesh: cargo (Rust $(sed -n 's/channel = "\(.*\)"/\1/p' "$(dirname "$0")/../rust-toolchain.toml")) is required; install it with rustup" >&2
  fi
  exit 1
fi
