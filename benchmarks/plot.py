"""Plot throughput (GB/s) against the number of classes C from saved benchmark JSON.

Reads ``benchmarks/compare.py --json`` output and/or pytest-benchmark JSON
(``--benchmark-autosave`` files under ``.benchmarks/``, or ``--benchmark-json``), and
draws one panel per operation (loss-only, loss+grad): a line per xentfast backend and
peer, log x-axis, with the yardsticks dashed (the all-core copy for loss+grad, the
all-core read for loss-only; ``np.copyto`` on one thread in records before 2026-12).

Examples
--------
::

    python benchmarks/compare.py --json bench.json
    python benchmarks/plot.py bench.json -o benchmarks.png

    pytest benchmarks/ --benchmark-autosave
    python benchmarks/plot.py .benchmarks/*/0001_*.json -o pytest-bench.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS: tuple[str, ...] = ("loss", "loss+grad")
ROOFLINE_KINDS = ("roofline", "yardstick")  # "roofline": records before 2026-12


def load_points(path: str) -> tuple[list[dict[str, Any]], str]:
    """Throughput records ``{contender, kind, n, c, op, gbps}`` and a title from one file.

    Parameters
    ----------
    path : str
        A ``compare.py --json`` report or a pytest-benchmark JSON file.

    Returns
    -------
    points : list of dict
    title : str
        Machine and date, when the file records them.
    """
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" in data:  # pytest-benchmark
        points = []
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if "bytes" not in info or not bench.get("stats"):
                continue
            points.append({**{k: info[k] for k in ("contender", "kind", "n", "c", "op")},
                           "gbps": info["bytes"] / bench["stats"]["median"] / 1e9})
        machine = data.get("machine_info", {})
        title = f"{machine.get('cpu', {}).get('brand_raw', '')} {data.get('datetime', '')}"
        return points, title.strip()
    points = [r for r in data.get("results", []) if r.get("status") == "ok"
              and r.get("dtype", "float32") == "float32"]  # 16-bit rows: other byte counts
    env = data.get("environment", {})
    title = f"{env.get('cpu', '')}, {env.get('usable_cpus', '?')} CPUs, {env.get('date', '')}"
    return points, title


def plot(points: Sequence[dict[str, Any]], out: str, *, title: str = "",
         linear: bool = False) -> None:
    """Draw GB/s vs C, one panel per operation in :data:`PANELS`, into ``out`` (PNG)."""
    ops = [op for op in PANELS if any(p["op"] == op for p in points)]
    if not ops:
        raise SystemExit("no loss / loss+grad throughput records in the input")
    fig, axes = plt.subplots(1, len(ops), figsize=(6.5 * len(ops), 4.8), sharey=True,
                             squeeze=False)
    contenders = list(dict.fromkeys(p["contender"] for p in points))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(contenders)}
    for ax, op in zip(axes[0], ops):
        series: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        kinds = {}
        for p in points:
            if p["op"] == op:
                series[p["contender"]][p["c"]].append(p["gbps"])
                kinds[p["contender"]] = p["kind"]
        for name, by_c in series.items():
            cs = sorted(by_c)
            gbps = [sorted(by_c[c])[len(by_c[c]) // 2] for c in cs]  # median per C
            if kinds[name] in ROOFLINE_KINDS:
                ax.plot(cs, gbps, "k--", lw=2, label=f"{name} (yardstick)")
                ax.fill_between(cs, gbps, max(gbps) * 1.5, color="0.9", zorder=0)
            else:
                style = "-o" if kinds[name] == "xentfast" else ":s"
                ax.plot(cs, gbps, style, color=colours[name], label=name,
                        lw=2 if kinds[name] == "xentfast" else 1.2)
        ax.set_xscale("log")
        if not linear:
            ax.set_yscale("log")
        ax.set_xlabel("classes C (log scale)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (bytes read + written / time)")
    ymax = max(p["gbps"] for p in points)
    axes[0][0].set_ylim(top=ymax * (1.1 if linear else 1.5))
    fig.suptitle("softmax cross-entropy throughput" + (f"\n{title}" if title else ""),
                 fontsize=10)
    legend: dict[str, Any] = {}  # one legend for all panels, outside them
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``plot.py FILE [FILE ...] -o OUT.png``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="compare.py --json or pytest-benchmark JSON")
    parser.add_argument("-o", "--out", default="benchmarks.png", help="PNG to write")
    parser.add_argument("--linear", action="store_true", help="linear GB/s axis (default log)")
    args = parser.parse_args(argv)
    points: list[dict[str, Any]] = []
    titles = []
    for path in args.files:
        found, title = load_points(path)
        points += found
        titles.append(title)
    points = [p for p in points if math.isfinite(p["gbps"]) and p["gbps"] > 0]
    plot(points, args.out, title="; ".join(dict.fromkeys(t for t in titles if t)),
         linear=args.linear)
    print(f"wrote {args.out} ({len(points)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
