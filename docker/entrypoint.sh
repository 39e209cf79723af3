#!/bin/sh
# Node image entry point: `pxcluster cluster join` from environment variables.
#
#   PXC_NAME, PXC_ADDRESS          required: node name, the IP every port binds on
#   PXC_DISKS                      space-separated disks (block devices or files); default
#                                  $PXC_DATA_DIR/disk.img, created sparse ($PXC_DISK_SIZE)
#   PXC_DISK_SIZE                  size of a disk file created here (default 10G)
#   PXC_ETCD                       etcd endpoints, comma-separated (every member: the
#                                  client moves to the next one when a member fails)
#   PXC_CLUSTER                    cluster name (default "default")
#   PXC_ZONE, PXC_DATA_DIR, PXC_API_PORT, PXC_DATA_PORT, PXC_NBD_PORT, PXC_LEASE_TTL,
#   PXC_DOCKER_PLUGIN_SOCKET, PXC_LOG_LEVEL, PXC_LOG_FORMAT (json)
#   PXC_API_TOKEN_FILE             the REST API's admin token; made (random) if the file is missing
#   PXC_API_READ_TOKEN_FILE        its read-only token
#   PXC_API_ADDRESS                where the API listens (default: loopback); off loopback it
#                                  needs PXC_API_TOKEN_FILE, or PXC_API_INSECURE=1
#   PXC_NBD_EXPOSE=1, PXC_NBD_TLS_DIR   serve NBD on PXC_ADDRESS too, with TLS (default: the
#                                  node's unix socket and loopback only)
#   PXC_WIPE=1                     erase disks formatted by another cluster
#   PXC_ETCD_CACERT, PXC_ETCD_CERT, PXC_ETCD_KEY, PXC_ETCD_USER, PXC_ETCD_PASSWORD_FILE
#                                  etcd TLS and user (read by pxcluster itself; https:// in PXC_ETCD)
#   PXC_DATA_TLS_CERT, PXC_DATA_TLS_KEY, PXC_DATA_TLS_CA   replica port TLS (all three or none)
set -eu

: "${PXC_NAME:?set PXC_NAME to the node name}"
: "${PXC_ADDRESS:?set PXC_ADDRESS to the IP address the node binds on}"
PXC_DATA_DIR="${PXC_DATA_DIR:-/var/lib/pxc}"
PXC_DISKS="${PXC_DISKS:-$PXC_DATA_DIR/disk.img}"
PXC_DISK_SIZE="${PXC_DISK_SIZE:-10G}"
PXC_ETCD="${PXC_ETCD:-http://127.0.0.1:2379}"

mkdir -p "$PXC_DATA_DIR"

set -- cluster join --name "$PXC_NAME" --address "$PXC_ADDRESS" --data-dir "$PXC_DATA_DIR" \
    --log-level "${PXC_LOG_LEVEL:-INFO}" --log-format "${PXC_LOG_FORMAT:-json}"
for disk in $PXC_DISKS; do
    case "$disk" in
        /dev/*) [ -b "$disk" ] || { echo "error: $disk is not a block device" >&2; exit 1; } ;;
        *) [ -e "$disk" ] || truncate -s "$PXC_DISK_SIZE" "$disk" ;;  # sparse: thin by design
    esac
    set -- "$@" --disk "$disk"
done
[ -n "${PXC_ZONE:-}" ] && set -- "$@" --zone "$PXC_ZONE"
[ -n "${PXC_API_PORT:-}" ] && set -- "$@" --api-port "$PXC_API_PORT"
[ -n "${PXC_DATA_PORT:-}" ] && set -- "$@" --data-port "$PXC_DATA_PORT"
[ -n "${PXC_NBD_PORT:-}" ] && set -- "$@" --nbd-port "$PXC_NBD_PORT"
[ -n "${PXC_LEASE_TTL:-}" ] && set -- "$@" --lease-ttl "$PXC_LEASE_TTL"
if [ -n "${PXC_API_TOKEN_FILE:-}" ]; then
    if [ ! -s "$PXC_API_TOKEN_FILE" ]; then
        mkdir -p "$(dirname "$PXC_API_TOKEN_FILE")"
        (umask 022; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$PXC_API_TOKEN_FILE")
    fi
    set -- "$@" --api-token-file "$PXC_API_TOKEN_FILE"
fi
[ -n "${PXC_API_READ_TOKEN_FILE:-}" ] && set -- "$@" --api-read-token-file "$PXC_API_READ_TOKEN_FILE"
[ -n "${PXC_API_ADDRESS:-}" ] && set -- "$@" --api-address "$PXC_API_ADDRESS"
[ "${PXC_API_INSECURE:-0}" = "1" ] && set -- "$@" --api-insecure
[ "${PXC_NBD_EXPOSE:-0}" = "1" ] && set -- "$@" --nbd-expose
[ -n "${PXC_NBD_TLS_DIR:-}" ] && set -- "$@" --nbd-tls-dir "$PXC_NBD_TLS_DIR"
[ -n "${PXC_DOCKER_PLUGIN_SOCKET:-}" ] && set -- "$@" --docker-plugin-socket "$PXC_DOCKER_PLUGIN_SOCKET"
[ "${PXC_WIPE:-0}" = "1" ] && set -- "$@" --wipe
[ -n "${PXC_DATA_TLS_CERT:-}" ] && set -- "$@" --data-tls-cert "$PXC_DATA_TLS_CERT"
[ -n "${PXC_DATA_TLS_KEY:-}" ] && set -- "$@" --data-tls-key "$PXC_DATA_TLS_KEY"
[ -n "${PXC_DATA_TLS_CA:-}" ] && set -- "$@" --data-tls-ca "$PXC_DATA_TLS_CA"

# etcd members may still be starting: wait (up to PXC_ETCD_WAIT s) for one to accept; all of
# them are passed on.
python3 - "$PXC_ETCD" "${PXC_ETCD_WAIT:-60}" <<'PY'
import socket, sys, time
from urllib.parse import urlparse

urls = [u.strip() for u in sys.argv[1].split(",") if u.strip()]
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    for url in urls:
        p = urlparse(url if "://" in url else "http://" + url)
        try:
            socket.create_connection((p.hostname, p.port or 2379), timeout=1).close()
            sys.exit(0)
        except OSError:
            pass
    time.sleep(1)
PY
export PXC_ETCD

# exec: pxcluster gets SIGTERM itself and hands its attachments off before it leaves.
exec pxcluster "$@"
