#!/usr/bin/env bash
# The README's first command: a local cluster (etcd + 3 nodes on 127.0.0.1, sparse files as
# disks), then a replicated volume written and read back through a real NBD client.
set -euo pipefail
cd "$(dirname "$0")/.."
PX=.venv/bin/pxcluster
# A filesystem left mounted by an earlier run goes first (its node is about to stop).
$PX volume unmount demo --state-dir .pxc-dev/host >/dev/null 2>&1 || true
$PX dev down >/dev/null 2>&1 || true
$PX dev up --nodes 3
echo
echo "== create a 256 MiB volume with 3 replicas and attach it on n1"
if ! $PX volume create demo --size 256M --repl 3 2>/dev/null; then
  echo "(volume demo exists from an earlier run: detaching it first)"
  $PX volume detach demo >/dev/null
fi
uri=$($PX volume attach demo --node n1 --wait)
echo "NBD URI: $uri"
echo
echo "== write 8 MiB of random data through nbdcopy, read it back, compare"
tmp=$(mktemp -d)
head -c 8M /dev/urandom >"$tmp/in"
nbdcopy "$tmp/in" "$uri"
nbdcopy "$uri" "$tmp/out"
if cmp -s -n 8388608 "$tmp/in" "$tmp/out"; then echo "read back identical: $(sha256sum <"$tmp/in" | cut -c1-16)"; else echo "MISMATCH"; exit 1; fi
rm -rf "$tmp"
echo
$PX volume inspect demo
echo
echo "== a filesystem on the volume: 'volume mount' (block device, mkfs.ext4 on first use, mount)"
why=""
[ "$(id -u)" = 0 ] || why="needs root (loop devices, mount)"
if [ -z "$why" ] && [ ! -e /dev/nbd0 ] && { [ ! -e /dev/fuse ] || ! command -v nbdfuse >/dev/null; }; then
  why="no kernel NBD (/dev/nbd0) and no /dev/fuse with nbdfuse on this host"
fi
if [ -n "$why" ]; then
  echo "skipped: $why"
else
  $PX volume detach demo >/dev/null
  mnt=$PWD/.pxc-dev/mnt/demo
  $PX volume mount demo "$mnt" --node n1 --state-dir .pxc-dev/host
  echo "hello from a replicated filesystem" >"$mnt/hello.txt"
  sync -f "$mnt"
  df -h "$mnt" | tail -1
  $PX device list --state-dir .pxc-dev/host
  echo "(unmount: $PX volume unmount demo --state-dir .pxc-dev/host; 'make down' does it too)"
fi
echo
echo "The cluster keeps running: try 'pxcluster volume list' (.venv/bin/pxcluster), 'make down' to stop."
