"""Cluster membership and state through etcd. Imports neither `replica` nor `pxcluster`."""

import os as _os

# gRPC's C core writes its own log lines (a failed TLS handshake, ...) to stderr; a CLI error
# is one line. Whoever wants them sets GRPC_VERBOSITY themselves.
_os.environ.setdefault("GRPC_VERBOSITY", "NONE")
