"""Ratios and Markdown tables of the harness's records (compare.py, gpu_check.py).

A record is a dict with at least ``contender``, ``kind``, ``n``, ``c``, ``op``,
``dtype``, ``labels``, ``status``, ``reason``, ``median_s``, ``bytes``, ``gbps`` and
``yardstick`` (see :func:`harness.runner.record`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .registry import EXP_FLOOR, UNSUPPORTED, ITEMSIZE, contenders

Record = dict[str, Any]


def _key(r: Record) -> tuple:
    return (r["n"], r["c"], r["op"], r["dtype"], r["labels"])


def add_ratios(records: Sequence[Record]) -> None:
    """Fill ``x_best_peer`` (fastest peer's time / this time), ``pct_of_yardstick``
    (this GB/s / its yardstick's GB/s, same case, same run) and ``pct_of_exp``
    (exp-par's time / this time, host rows, where the run has it) in place."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(_key(r), []).append(r)
    for group in groups.values():
        ok = [r for r in group if r.get("status", "ok") == "ok" and r.get("median_s")]
        peers = [r["median_s"] for r in ok if r["kind"] == "peer"]
        yardsticks = {r["contender"]: r["gbps"] for r in ok if r["kind"] == "yardstick"}
        floor = next((r["median_s"] for r in ok if r["contender"] == EXP_FLOOR), None)
        for r in ok:   # (exp-par is the host's floor: no ratio for device rows)
            r["pct_of_exp"] = (100 * floor / r["median_s"] if floor and r["kind"] != "yardstick"
                               and r.get("device", "host") == "host" else None)
            r["x_best_peer"] = (min(peers) / r["median_s"]
                                if peers and r["kind"] != "yardstick" else None)
            base = yardsticks.get(r.get("yardstick"))
            r["pct_of_yardstick"] = 100 * r["gbps"] / base if base else None


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def shape_label(r: Record) -> str:
    extra = "" if r["dtype"] == "float32" else f" {r['dtype']}"
    return f"{r['n']}x{r['c']}{extra}" + (" prob" if r["labels"] == "prob" else "")


def _notes(records: Sequence[Record]) -> list[str]:
    return [f"- {r['contender']} ({r['op']} {shape_label(r)}): {r['status']}: {r['reason']}"
            for r in records if r.get("status", "ok") != "ok"
            and not r["reason"].startswith(UNSUPPORTED)]  # by design, not news


def format_time_table(records: Sequence[Record]) -> str:
    """Markdown table: shape, op, contender, ms, GB/s, x best peer, % of copy, % of read,
    % of exp.

    ``% of copy`` (rows that write an (n, c) output: loss+grad) and ``% of read``
    (loss-only) are the row's GB/s over its all-core yardstick's on the same bytes;
    ``% of exp`` the exp-par yardstick's time over the row's.  Skipped and failed
    contenders are listed under the table."""
    add_ratios(records)
    rows = []
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        value = r.get("pct_of_yardstick")
        pct = "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.2g}"
        copy_side = r.get("yardstick", "").startswith("copy")
        best = r.get("x_best_peer")
        of_exp = r.get("pct_of_exp")
        rows.append([shape_label(r), r["op"], r["contender"], _fmt(r["median_s"] * 1e3),
                     _fmt(r["gbps"]), f"{best:.2f}" if best else "-",
                     pct if copy_side else "-", "-" if copy_side else pct,
                     "-" if of_exp is None else f"{of_exp:.0f}"])
    table = markdown(["shape", "op", "contender", "ms", "GB/s", "x best peer", "% of copy",
                      "% of read", "% of exp"], rows, "lllrrrrrr")
    registry = contenders()
    shown = dict.fromkeys(r["contender"] for r in records if r.get("status", "ok") == "ok")
    legend = ("\nms: median across rounds of each process's median; GB/s: (logits read + "
              "labels read + (n, c) output written) / time; x best peer: fastest peer's time "
              "/ this time; % of copy: this GB/s / copy-par's (every core copying the logits: "
              "read + write), for loss+grad; % of read: this GB/s / read-par's (every core "
              "summing the logits' bytes), for loss-only; % of exp: exp-par's time / this time "
              "(the arithmetic floor: one exp per logit on every core, no memory).")
    legend += "\n\nContenders:\n" + "\n".join(
        f"- {name}: {registry[name].summary}" for name in shown if name in registry)
    notes = _notes(records)
    return table + legend + ("\n\nNot measured:\n" + "\n".join(notes) if notes else "")


def format_memory_table(records: Sequence[Record]) -> str:
    """Markdown table of :func:`harness.runner.measure_memory` records (MB = 10**6 bytes)."""
    rows = []
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        logits = r["n"] * r["c"] * ITEMSIZE[r["dtype"]]
        temporaries = max(r["extra_peak_bytes"] - r["outputs_bytes"], 0)  # page rounding
        rows.append([
            shape_label(r), r["op"], r["contender"], f"{r['inputs_bytes'] / 1e6:.0f}",
            f"{r['outputs_bytes'] / 1e6:.0f}", f"{r['extra_peak_bytes'] / 1e6:.0f}"
            + ("" if r["exact"] else " (<=)"), f"{temporaries / 1e6:.0f}",
            f"{r['extra_peak_bytes'] / logits:.2f}",
        ])
    table = markdown(["shape", "op", "contender", "inputs MB", "outputs MB", "call peak MB",
                      "temporaries MB", "peak / logits"], rows, "lllrrrrr")
    legend = ("\ncall peak: max RSS during the call above the RSS just before it (getrusage); "
              "temporaries: call peak - outputs; (<=): an earlier peak hid the call's.")
    notes = _notes(records)
    return table + legend + ("\n\nNot measured:\n" + "\n".join(notes) if notes else "")


def format_coldstart_table(records: Sequence[Record]) -> str:
    """Markdown table of :func:`harness.runner.measure_coldstart` records."""
    rows = [[r["what"], r["backend"] or "-", _fmt(r["seconds"] and r["seconds"] * 1e3),
             _fmt(r.get("steady_s") and r["steady_s"] * 1e3), r.get("error", "")]
            for r in records]
    return markdown(["what", "backend", "ms", "steady call ms", "error"], rows, "llrrl")
