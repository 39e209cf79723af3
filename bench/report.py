"""Ratios, the issue's targets, the printed table and the PNG chart for `bench/fio_bench.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fiorun import WORKLOADS

# Which reference each target is compared with (the same promise): default volumes against
# nbdkit's file plugin (honours FLUSH/FUA), --sync-writes volumes against nbdkit with every
# write forced durable.
REFERENCE: dict[str, str] = {
    "repl1": "nbdkit",
    "repl3": "nbdkit",
    "repl1_sync": "nbdkit_fua",
    "repl3_sync": "nbdkit_fua",
    # Encrypted volumes against the same volume unencrypted: the cost of encryption alone.
    "repl1_enc": "repl1",
    "repl3_enc": "repl3",
}
# The C replication peer: QEMU's quorum driver over three nbdkit file servers, behind qemu-nbd
# (one front process, three replica processes, NBD between them: a repl-3 volume's topology).
PEER: dict[str, str] = {"repl3": "quorum", "repl3_sync": "quorum_fua"}
ORDER = (
    "native",
    "nbdkit",
    "nbdkit_fua",
    "quorum",
    "quorum_fua",
    "repl1",
    "repl3",
    "repl1_sync",
    "repl3_sync",
    "repl1_enc",
    "repl3_enc",
)


@dataclass(frozen=True)
class Target:
    target: str
    workload: str
    metric: str  # "iops" (throughput ratio, at least) or "p50_us" (latency ratio, at most)
    bound: float

    def check(self, ratio: float) -> bool:
        return ratio >= self.bound if self.metric == "iops" else ratio <= self.bound

    def describe(self) -> str:
        op = ">=" if self.metric == "iops" else "<="
        what = "p50 ratio" if self.metric == "p50_us" else "ratio"
        return f"{self.target} {self.workload} {what} {op} {self.bound}"


TARGETS: tuple[Target, ...] = (
    Target("repl1", "seq_write_1m_qd8", "iops", 0.90),
    Target("repl3", "seq_write_1m_qd8", "iops", 0.40),
    Target("repl1", "rand_write_4k_qd16", "iops", 1.10),
    Target("repl3", "rand_write_4k_qd16", "iops", 0.50),
    Target("repl1", "rand_write_4k_qd16_fsync32", "iops", 1.20),
    Target("repl3", "rand_write_4k_qd16_fsync32", "iops", 0.70),
    Target("repl1", "rand_read_4k_qd16", "iops", 1.00),
    Target("repl3", "rand_read_4k_qd16", "iops", 1.00),
    Target("repl1", "rand_write_4k_qd1", "p50_us", 1.3),
    Target("repl3", "rand_write_4k_qd1", "p50_us", 2.5),
    Target("repl1_sync", "rand_write_4k_qd16", "iops", 1.00),
    Target("repl3_sync", "rand_write_4k_qd16", "iops", 0.50),
)

Cells = dict[str, dict[str, dict[str, float]]]  # target -> workload -> metric -> value


def ratios(cells: Cells) -> Cells:
    """Each metric over its reference's, per target and workload."""
    out: Cells = {}
    for t, ref in REFERENCE.items():
        if t not in cells or ref not in cells:
            continue
        out[t] = {}
        for w, m in cells[t].items():
            r = cells[ref].get(w)
            if not r:
                continue
            out[t][w] = {k: round(v / r[k], 2) if r.get(k) else 0.0 for k, v in m.items()}
    return out


def peer_ratios(cells: Cells) -> Cells:
    """repl-3 volumes over the C replication peer, per workload: IOPS (MiB/s) and latency."""
    out: Cells = {}
    for t, peer in PEER.items():
        if t not in cells or peer not in cells:
            continue
        out[t] = {}
        for w, m in cells[t].items():
            r = cells[peer].get(w)
            if r:
                out[t][w] = {k: round(v / r[k], 2) if r.get(k) else 0.0 for k, v in m.items()}
    return out


def peer_table(cells: Cells, rat: Cells) -> str:
    lines = [
        "| workload | ours | peer | IOPS | peer IOPS | ratio IOPS | p50 us | peer p50 us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in WORKLOADS:
        for t, peer in PEER.items():
            m, p, r = (cells.get(x, {}).get(w.key) for x in (t, peer, t))
            ratio = rat.get(t, {}).get(w.key)
            if m is None or p is None or r is None or ratio is None:
                continue
            lines.append(
                f"| {w.label} | {t} | {peer} | {m['iops']:,.0f} | {p['iops']:,.0f} | "
                f"{ratio['iops']:.2f} | {m['p50_us']:,.0f} | {p['p50_us']:,.0f} |"
            )
    return "\n".join(lines)


def check_targets(rat: Cells) -> list[dict[str, Any]]:
    rows = []
    for tg in TARGETS:
        r = rat.get(tg.target, {}).get(tg.workload, {}).get(tg.metric)
        rows.append(
            {
                "target": tg.describe(),
                "ratio": r,
                "met": None if r is None else tg.check(r),
            }
        )
    return rows


def table(cells: Cells, rat: Cells) -> str:
    lines = [
        "| workload | target | MiB/s | IOPS | p50 us | p99 us "
        "| ratio MiB/s | ratio p50 | ratio p99 | server CPU us/IO | load1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in WORKLOADS:
        for t in ORDER:
            m = cells.get(t, {}).get(w.key)
            if m is None:
                continue
            r = rat.get(t, {}).get(w.key)
            rs = (
                [f"{r['mib_s']:.2f}", f"{r['p50_us']:.2f}", f"{r['p99_us']:.2f}"]
                if r
                else ["-", "-", "-"]
            )
            lines.append(
                f"| {w.label} | {t} | {m['mib_s']:,.1f} | {m['iops']:,.0f} | "
                f"{m['p50_us']:,.0f} | {m['p99_us']:,.0f} | "
                + " | ".join(rs)
                + f" | {m.get('cpu_us_per_io', '-')} | {m.get('load1', '-')} |"
            )
    return "\n".join(lines)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    for r in rows:
        met = "-" if r["met"] is None else ("met" if r["met"] else "MISSED")
        lines.append(f"| {r['target']} | {r['ratio']} | {met} |")
    return "\n".join(lines)


def chart(cells: Cells, scaling: dict[str, float], path: Path) -> bool:
    """Write the PNG; False (and no chart) without matplotlib (the `[bench]` extra)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    flat = list(axes.flat)
    for ax, w in zip(flat, WORKLOADS, strict=False):
        names = [t for t in ORDER if w.key in cells.get(t, {})]
        metric = "mib_s" if w.bs == "1m" else "iops"
        vals = [cells[t][w.key][metric] for t in names]
        colors = ["#777" if t.startswith(("native", "nbdkit")) else "#2a7" for t in names]
        ax.bar(names, vals, color=colors)
        ax.set_title(f"{w.label} ({'MiB/s' if metric == 'mib_s' else 'IOPS'})", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax = flat[len(WORKLOADS)]
    if scaling:
        xs = [int(k) for k in scaling]
        ax.plot(xs, list(scaling.values()), marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(bottom=0)
    ax.set_title("repl-3 rand write 4 KiB QD16, IOPS vs volumes", fontsize=9)
    for ax in flat[len(WORKLOADS) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
