#!/usr/bin/env bash
# Installs what pxcluster and its tests need: system tools through apt (as root), then a venv
# with the package and its [dev] extra. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v fio >/dev/null || need+=(fio)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
# The host layer (volume map/mount): nbdfuse is in libnbd-bin (above), nbd-client where the
# kernel has NBD; filesystems and their checks; the registry scenario's application and client.
command -v nbd-client >/dev/null || need+=(nbd-client)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v losetup >/dev/null || need+=(mount)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
# The per-block checksum helper (replica/_blockcrc.c) is built by pip install.
command -v gcc >/dev/null || need+=(gcc)
# Headless Chromium and its WebDriver for the web console's browser tests (tests/console).
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
# The stamped-block workload of the tests speaks NBD through libnbd's Python binding, which
# Debian builds for its own /usr/bin/python3 only.
/usr/bin/python3 -c "import nbd" 2>/dev/null || need+=(python3-libnbd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing system tools: ${need[*]}" >&2
    echo "install them (Debian: sudo apt-get install ${need[*]}) and run this again" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
  || ! compgen -G "replica/_blockcrc*.so" >/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
