# pxcluster storage node. Runs `pxcluster cluster join` configured by PXC_* environment
# variables (docker/entrypoint.sh lists them). Run it privileged: it opens raw disks, and the
# Docker volume plugin drives the kernel NBD client and mounts filesystems.
FROM python:3.11-slim

# nbd-client, e2fsprogs, util-linux: the volume plugin's Mount (kernel NBD, mkfs, mount).
RUN apt-get update \
    && apt-get install -y --no-install-recommends nbd-client e2fsprogs util-linux \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml ./
COPY membership membership
COPY replica replica
COPY pxcluster pxcluster
RUN pip install --no-cache-dir . && rm -rf /src

COPY docker/entrypoint.sh /usr/local/bin/pxc-entrypoint
WORKDIR /var/lib/pxc
VOLUME ["/var/lib/pxc"]
EXPOSE 9001 9002 10809
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://%s:%s/readyz' % (os.environ.get('PXC_API_ADDRESS', '127.0.0.1'), os.environ.get('PXC_API_PORT', '9001')), timeout=2)"
ENTRYPOINT ["/usr/local/bin/pxc-entrypoint"]
