"""The search report's figure: the frontier (searched against uniform recipes, predicted and
measured) and, per budget, the bit map (bits per weight of every layer, block by block)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_BLOCK = re.compile(r"^(?P<stack>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def bit_map(choice: dict[str, str], bits: dict[str, dict[str, float]]) -> tuple[np.ndarray, list[int], list[str]]:
    """[blocks, module kinds] bits per weight of each layer's choice (NaN where a block has no
    such layer), with the block indices and the module kinds (in order of first appearance).
    Layers outside a numbered stack are left out."""
    cells: dict[tuple[int, str], float] = {}
    kinds: list[str] = []
    for name, cname in choice.items():
        m = _BLOCK.match(name)
        if not m:
            continue
        rest = m["rest"]
        if rest not in kinds:
            kinds.append(rest)
        cells[(int(m["index"]), rest)] = bits[name][cname]
    blocks = sorted({i for i, _ in cells})
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for (i, rest), v in cells.items():
        grid[blocks.index(i), kinds.index(rest)] = v
    return grid, blocks, kinds


def write_plot(report: dict, bits: dict[str, dict[str, float]], path: Path) -> Path | None:
    """report.png beside report.json (see the module docstring); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report's tables are written all the same
        return None
    budgets = report["budgets"]
    n = len(budgets)
    fig, axes = plt.subplots(1, 1 + n, figsize=(7 + 3.2 * n, 6), dpi=110, gridspec_kw={"width_ratios": [2.2] + [1] * n},
                             squeeze=False, layout="constrained")
    ax = axes[0][0]
    uni = sorted(report["uniform"], key=lambda u: u["bpw"])
    ax.plot([u["bpw"] for u in uni], [u["predicted_damage"] for u in uni], "o--", mfc="none", color="0.45",
            label="uniform, predicted")
    for u in uni:
        ax.annotate(u["candidate"], (u["bpw"], u["predicted_damage"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7, color="0.35")
    measured_uni = [u for u in uni if (u.get("measured") or {}).get("kl")]
    if measured_uni:
        ax.plot([u["measured"]["bpw"] for u in measured_uni], [u["measured"]["kl"] for u in measured_uni], "o-",
                color="0.2", label="uniform, measured KL")
    srch = sorted(budgets, key=lambda b: b["bpw"])
    ax.plot([b["bpw"] for b in srch], [b["predicted_damage"] for b in srch], "s--", mfc="none", color="C1",
            label="searched, predicted")
    measured = [b for b in srch if b["measured"].get("kl")]
    if measured:
        ax.plot([b["measured"]["bpw"] for b in measured], [b["measured"]["kl"] for b in measured], "s-", color="C1",
                lw=2, label="searched, measured KL")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the searched layers (everything stored)")
    ax.set_ylabel("predicted damage / measured KL (nats per token), log scale")
    ax.set_title(f"{Path(report['model']).name}: searched and uniform recipes", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    values = [v for b in budgets for n_, c in b["layers"].items() for v in [bits[n_][c]]]
    vmin, vmax = (min(values), max(values)) if values else (0, 1)
    image = None
    for k, b in enumerate(budgets):
        axb = axes[0][1 + k]
        grid, blocks, kinds = bit_map(b["layers"], bits)
        image = axb.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        axb.set_xticks(range(len(kinds)), [s.split(".")[-1] for s in kinds], rotation=90, fontsize=7)
        step = max(1, len(blocks) // 16)
        axb.set_yticks(range(0, len(blocks), step), [str(blocks[i]) for i in range(0, len(blocks), step)], fontsize=7)
        asked = f"budget {b['budget']} bpw" if b["kind"] == "bpw" else f"size {b['value'] / 1e6:.2f} MB"
        axb.set_title(f"{asked}: {b['bpw']:.2f} bpw", fontsize=9)
        if k == 0:
            axb.set_ylabel("block")
    if image is not None:
        fig.colorbar(image, ax=[axes[0][1 + k] for k in range(n)], label="bits per weight of the layer", shrink=0.8)
    fig.savefig(path)
    plt.close(fig)
    return path
