"""Tables and the FLOPs-vs-time plot from benchmark rows.

    python -m benchmarks.report RESULTS.json [--out DIR]

RESULTS.json is pytest-benchmark's ``--benchmark-json`` file or the ``results.json`` the
harness writes; every benchmark's ``extra_info`` is a row (see ``benchmarks.harness``), its
median seconds per call taken from ``stats`` when present. Writes DIR/table.md and
DIR/plot.png (DIR defaults to the JSON's folder) and prints the table.

Table: one line per (unit, mode, dtype, batch), each provider's median time side by side,
then fastres' achieved TFLOP/s, % of the measured peak, time over the roofline floor and its
speedup over the fastest other provider.
Plot: FLOPs (x) against seconds (y), log-log, for the headline dtype (bf16 when present):
colour = provider, marker = unit kind, hollow = train; the compute roofline
``t = FLOPs / peak`` as a line and each unit's roofline floor (compute or memory) as a grey
bar, so memory-bound units (1x1 convs, small layers) sit visibly above the line.
"""
import argparse
import json
import os
from typing import Dict, List, Optional, Tuple

from benchmarks.providers import PROVIDERS

KIND_ORDER = {"conv": 0, "block": 1, "network": 2}
KIND_MARKER = {"conv": "o", "block": "s", "network": "^"}
DTYPE_ORDER = ("bf16", "fp16", "fp32")
REQUIRED = ("unit", "provider", "mode", "dtype", "batch", "flops", "bytes", "device")


def load(path: str) -> List[dict]:
    """The rows of a benchmark JSON (pytest-benchmark's or the harness'), median seconds in
    ``time_s``."""
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        if not all(k in info for k in REQUIRED):
            continue
        if bench.get("stats", {}).get("median"):
            info["time_s"] = bench["stats"]["median"]
        rows.append(info)
    if not rows:
        raise ValueError(f"{path}: no benchmark rows with extra_info keys {REQUIRED}")
    return rows


def _ms(seconds) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.3g}"


def _groups(rows: List[dict]) -> Dict[Tuple, Dict[str, dict]]:
    groups: Dict[Tuple, Dict[str, dict]] = {}
    for r in rows:
        key = (KIND_ORDER.get(r.get("kind"), 3), r["unit"], r["mode"], r["dtype"], r["batch"])
        groups.setdefault(key, {})[r["provider"]] = r
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][2], DTYPE_ORDER.index(kv[0][3])
                                                      if kv[0][3] in DTYPE_ORDER else 9,
                                                      kv[0][0], kv[0][4], kv[0][1])))


def peaks_line(rows: List[dict]) -> str:
    peaks = {}
    for r in rows:
        peaks.setdefault(r["dtype"], (r.get("peak_tflops"), r.get("peak_gbps")))
    parts = [f"{d} matmul {f:.3g} TFLOP/s" for d, (f, _) in peaks.items() if f]
    bw = next((b for _, b in peaks.values() if b), None)
    return "measured peaks: " + ", ".join(parts) + (f"; copy {bw:.4g} GB/s" if bw else "")


def markdown(rows: List[dict]) -> str:
    """The side-by-side table (times in ms)."""
    provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    devices = sorted({r["device"] for r in rows})
    notes = sorted({r.get("note") for r in rows if r.get("note")})
    head = [f"device: {', '.join(devices)}" + (f" ({'; '.join(notes)})" if notes else ""),
            peaks_line(rows), ""]
    cols = (["unit", "mode", "dtype", "batch", "GFLOP", "MB", "floor ms"]
            + [f"{p} ms" for p in provs]
            + ["fastres TFLOP/s", "fastres % peak", "fastres / floor", "fastres speedup"])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (_, unit, mode, dtype, batch), group in _groups(rows).items():
        any_row = next(iter(group.values()))
        fast = group.get("fastres")
        others = [r["time_s"] for p, r in group.items() if p != "fastres"]
        cells = [unit, mode, dtype, str(batch), f"{any_row['flops'] / 1e9:.3g}",
                 f"{any_row['bytes'] / 1e6:.3g}", _ms(any_row.get("floor_s"))]
        cells += [_ms(group[p]["time_s"]) if p in group else "" for p in provs]
        if fast is not None:
            t = fast["time_s"]
            cells += [f"{fast['flops'] / t / 1e12:.3g}",
                      f"{100 * fast['flops'] / t / (fast['peak_tflops'] * 1e12):.3g}"
                      if fast.get("peak_tflops") else "",
                      f"{t / fast['floor_s']:.3g}" if fast.get("floor_s") else "",
                      f"{min(others) / t:.2f}x" if others else ""]
        else:
            cells += [""] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines) + "\n"


def plot(rows: List[dict], path: str) -> None:
    """The log-log FLOPs-vs-seconds plot with the roofline, to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtype = next((d for d in DTYPE_ORDER if any(r["dtype"] == d for r in rows)), rows[0]["dtype"])
    rows = [r for r in rows if r["dtype"] == dtype]
    colors = dict(zip(PROVIDERS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, ax = plt.subplots(figsize=(9, 6.5))
    seen_floor = set()
    for r in rows:
        key = (r["unit"], r["mode"], r["batch"])
        if r.get("floor_s") and key not in seen_floor:
            seen_floor.add(key)
            ax.scatter(r["flops"], r["floor_s"], marker="_", s=120, color="0.6", zorder=1)
        c = colors.get(r["provider"], "k")
        hollow = r["mode"] == "train"
        ax.scatter(r["flops"], r["time_s"], marker=KIND_MARKER.get(r.get("kind"), "x"), s=28,
                   facecolors="none" if hollow else c, edgecolors=c, zorder=2)
    peak = rows[0].get("peak_tflops")
    if peak:
        lo = min(r["flops"] for r in rows) / 2
        hi = max(r["flops"] for r in rows) * 2
        ax.plot([lo, hi], [lo / (peak * 1e12), hi / (peak * 1e12)], "k-", lw=1,
                label=f"compute roofline ({peak:.3g} TFLOP/s measured)")
    for p in PROVIDERS:
        if any(r["provider"] == p for r in rows):
            ax.scatter([], [], color=colors[p], label=p)
    for kind, m in KIND_MARKER.items():
        ax.scatter([], [], marker=m, facecolors="none", edgecolors="k", label=kind)
    ax.scatter([], [], marker="_", color="0.6", label="roofline floor (compute or memory)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per call (FlopCounterMode, 1 MAC = 2 FLOPs)")
    ax.set_ylabel("seconds per call (median)")
    note = rows[0].get("note")
    ax.set_title(f"{rows[0]['device']}, {dtype}: FLOPs vs wall-clock (filled = inference, "
                 f"hollow = train)" + (f"\n{note}" if note else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows: List[dict], out_dir: str) -> Tuple[str, Optional[str]]:
    """Write table.md and plot.png into ``out_dir``; return their paths (no plot, and None,
    where matplotlib is not installed)."""
    os.makedirs(out_dir, exist_ok=True)
    table, png = os.path.join(out_dir, "table.md"), os.path.join(out_dir, "plot.png")
    with open(table, "w") as f:
        f.write(markdown(rows))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("benchmarks.report: matplotlib is not installed; no plot written")
        return table, None
    plot(rows, png)
    return table, png


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="pytest-benchmark JSON or the harness' results.json")
    parser.add_argument("--out", help="output folder (default: the JSON's folder)")
    args = parser.parse_args(argv)
    rows = load(args.results)
    table, png = write(rows, args.out or os.path.dirname(os.path.abspath(args.results)))
    with open(table) as f:
        print(f.read())
    print(f"wrote {table}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
