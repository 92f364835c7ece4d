"""Turn benchmark records into the markdown tables of BENCHMARKS.md.

    python -m benchmarks.report benchmarks/results/layer-cpu.json
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict


def _geomean(values):
    values = [v for v in values if v is not None]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def layer_table(records: list[dict]) -> str:
    """One row per (shape, mode): time of each provider, then fused/linear and eager/fused."""
    providers = sorted({r["provider"] for r in records},
                       key=lambda p: (p != "linear", p != "eager", p != "compiled-eager", p))
    fused = [p for p in providers if p.startswith("fused-")]
    rows, minima = defaultdict(dict), defaultdict(dict)
    saved = defaultdict(dict)
    for r in records:
        rows[(r["shape"], r["mode"])][r["provider"]] = r["median_ms"]
        minima[(r["shape"], r["mode"])][r["provider"]] = r.get("min_ms")
        if r.get("saved_bytes") is not None:
            saved[r["shape"]][r["provider"]] = (r["saved_bytes"], r["x_bytes"], r["n"])

    head = ["shape", "mode", *[f"{p} ms" for p in providers]]
    head += [f"{p} / linear" for p in fused] + [f"eager / {p}" for p in fused]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = defaultdict(list)
    for (shape, mode), t in sorted(rows.items()):
        cells = [shape, mode] + [f"{t[p]:.3f}" if p in t else "-" for p in providers]
        for p in fused:
            ratio = t[p] / t["linear"] if p in t and "linear" in t else None
            ratios[(p, mode, "linear")].append(ratio)
            cells.append(f"{ratio:.3f}" if ratio else "-")
        for p in fused:
            ratio = t["eager"] / t[p] if p in t and "eager" in t else None
            ratios[(p, mode, "eager")].append(ratio)
            cells.append(f"{ratio:.2f}" if ratio else "-")
        lines.append("| " + " | ".join(cells) + " |")

    lines.append("")
    lines.append("Geometric means over shapes, of medians (and of minima, steadier on a shared CPU):")
    for (p, mode, base), values in sorted(ratios.items()):
        g = _geomean(values)
        if g is not None:
            num, den = ("eager", p) if base == "eager" else (p, "linear")
            g_min = _geomean([t[num] / t[den] for (_, m), t in minima.items()
                              if m == mode and t.get(num) and t.get(den)])
            what = f"{num} / {den}"
            extra = f" (minima {g_min:.3f})" if g_min else ""
            lines.append(f"- {mode}: {what} = {g:.3f}{extra}")

    lines.append("")
    lines.append("Saved for backward (bytes beyond x, per token):")
    for shape, per in sorted(saved.items()):
        cells = [f"{p} {(b - xb) / n:.0f}" for p, (b, xb, n) in sorted(per.items())]
        lines.append(f"- {shape}: " + ", ".join(cells))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    for path in argv:
        with open(path) as f:
            doc = json.load(f)
        print(f"## {doc['machine']} ({doc['date']}, commit {doc['commit']})\n")
        print(layer_table(doc["records"]))


if __name__ == "__main__":
    main(sys.argv[1:])
