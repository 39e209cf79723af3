"""The etcd key schema: the only module that builds key strings.

Everything lives under `/pxc/<cluster>/`; see DESIGN.md "etcd keys".
"""

from __future__ import annotations


class Keys:
    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.root = f"/pxc/{cluster}/"

    def _k(self, *parts: str) -> bytes:
        return (self.root + "/".join(parts)).encode()

    def cluster_record(self) -> bytes:
        return self._k("cluster")

    def leader(self) -> bytes:
        return self._k("leader")

    def nodes_prefix(self) -> bytes:
        return self._k("nodes", "")

    def node(self, node_id: str) -> bytes:
        return self._k("nodes", node_id)

    def alive_prefix(self) -> bytes:
        return self._k("alive", "")

    def alive(self, node_id: str) -> bytes:
        return self._k("alive", node_id)

    def volumes_prefix(self) -> bytes:
        return self._k("volumes", "")

    def volume(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id)

    def volume_sub_prefix(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "")

    def epoch(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "epoch")

    def attachment(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "attachment")

    def target(self, volume_id: str) -> bytes:
        """Desired attach node, written by the CLI/API, reconciled by node agents."""
        return self._k("volumes", volume_id, "target")

    def failover(self, volume_id: str) -> bytes:
        """The last move of the volume's attachment (FailoverRecord)."""
        return self._k("volumes", volume_id, "failover")

    def snapshots_prefix(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "snapshots", "")

    def snapshot(self, volume_id: str, snap_id: str) -> bytes:
        """A snapshot (SnapshotRecord): asked for by the CLI, taken by the serving engine."""
        return self._k("volumes", volume_id, "snapshots", snap_id)

    def revert(self, volume_id: str) -> bytes:
        """A revert asked for (RevertRecord), carried out by the serving engine."""
        return self._k("volumes", volume_id, "revert")

    def hydration(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "hydration")

    def scrub(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "scrub")

    def schedule_state(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "schedule")

    def drain_op(self, node_id: str) -> bytes:
        return self._k("ops", f"drain-{node_id}")

    def rebuild_op(self, volume_id: str, node_id: str) -> bytes:
        return self._k("ops", f"rebuild-{volume_id}-{node_id}")

    def replicas_prefix(self, volume_id: str) -> bytes:
        return self._k("volumes", volume_id, "replicas", "")

    def replica(self, volume_id: str, node_id: str) -> bytes:
        return self._k("volumes", volume_id, "replicas", node_id)

    def replica_key(self) -> bytes:
        """The cluster key replica connections prove (replica/auth.py); made with the cluster."""
        return self._k("replica_key")

    def secret(self, volume_id: str) -> bytes:
        """A volume's encryption key. etcd holds it: protect etcd (TLS, auth) accordingly."""
        return self._k("secrets", volume_id)

    def name(self, volume_name: str) -> bytes:
        return self._k("names", volume_name)

    def trash_prefix(self, node_id: str) -> bytes:
        return self._k("trash", node_id, "")

    def trash(self, node_id: str, volume_id: str) -> bytes:
        """A deleted volume whose chunks `node_id` still has to free."""
        return self._k("trash", node_id, volume_id)

    def ops_prefix(self) -> bytes:
        return self._k("ops", "")

    def op(self, op_id: str) -> bytes:
        return self._k("ops", op_id)

    def split(self, key: bytes) -> list[str]:
        """Parts of a key below the cluster root."""
        return key.decode().removeprefix(self.root).split("/")
