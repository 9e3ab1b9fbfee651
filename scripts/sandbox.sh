#!/bin/sh
# Run a command inside a private network + mount namespace (testbed.md §8).
#
#   scripts/sandbox.sh env MESH_REQUIRE_NETNS=1 cargo test --offline -p mesh-testbed
#
# The sandbox's root netns has only `lo` (nothing can leave the box), /run/netns is a private
# tmpfs (namespace names cannot clash with the host or other runs), and everything created inside
# disappears when the command exits, even after a crash. Build outside first (`cargo test
# --no-run`): there is no network inside.
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "sandbox.sh: must run as root (needs CAP_SYS_ADMIN and CAP_NET_ADMIN)" >&2
    exit 1
fi
for tool in unshare mount ip; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "sandbox.sh: '$tool' not found; install: apt-get install -y util-linux mount iproute2" >&2
        exit 1
    fi
done

# Keep this in step with SANDBOX_SCRIPT in src/sandbox.rs.
exec unshare --mount --net --propagation private -- env MESH_SANDBOX=1 sh -c '
set -e
mkdir -p /run/netns
mount -t tmpfs tmpfs /run/netns
ip link set lo up
exec "$@"' mesh-sandbox "$@"
