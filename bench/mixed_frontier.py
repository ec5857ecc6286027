"""The searched recipes on the side-by-side plot, and their per-layer bit maps.

    python -m bench.mixed_frontier [--search bench/results/mixed-smollm2] [--quality bench/results/smollm2]

Reads what `lowbit search` left in SEARCH (sensitivity.json, bpw-B/recipe.yaml, bpw-B/eval.json,
each eval measured as bench.quality measures: same text, windows and tokens) and the side-by-side
rows in QUALITY/quality.json; draws every tool's Pareto front with the searched points as one more
series (SEARCH/frontier.png), and the bits per weight each budget gave every layer
(SEARCH/bitmap.png). Everything is read from committed files; nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowbit.mixed.plot import bit_map
from lowbit.recipe import Recipe

from .common import RESULTS
from .quality import pareto_plot


def searched_rows(search: Path) -> list[dict]:
    rows = []
    for d in sorted(search.glob("bpw-*"), key=lambda p: float(p.name.removeprefix("bpw-"))):
        m = json.loads((d / "eval.json").read_text())
        rows.append({"tool": "lowbit search", "status": "ok", "metric": "kl", "kl": m["kl"], "bpw": m["bpw"],
                     "budget": float(d.name.removeprefix("bpw-")), "recipe": d / "recipe.yaml"})
    return rows


def choices(recipe: Recipe, layers: list[str]) -> dict[str, str]:
    """The candidate name each layer got: its scheme's FORMAT-gGROUP."""
    out = {}
    for name in layers:
        s = recipe.scheme_for(name)
        out[name] = f"{s.format}-g{s.group_size}" if s.group_size != -1 else f"{s.format}-row"
    return out


def bitmap_figure(search: Path, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = json.loads((search / "sensitivity.json").read_text())["layers"]
    bits = {n: {c: b / row["weights"] for c, b in row["bits"].items()} for n, row in table.items()}
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows) + 1.5, 6), dpi=110, squeeze=False, layout="constrained")
    image = None
    for ax, r in zip(axes[0], rows):
        grid, blocks, kinds = bit_map(choices(Recipe.from_file(r["recipe"]), list(table)), bits)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=8, interpolation="nearest")
        ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=90, fontsize=7)
        step = max(1, len(blocks) // 15)
        ax.set_yticks(range(0, len(blocks), step), [str(blocks[i]) for i in range(0, len(blocks), step)], fontsize=7)
        ax.set_title(f"{r['budget']:g} bpw budget\nKL {r['kl']:.3f}", fontsize=9)
    axes[0][0].set_ylabel("block")
    fig.colorbar(image, ax=list(axes[0]), label="bits per weight of the layer (everything stored)", shrink=0.8)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--search", default=str(RESULTS / "mixed-smollm2"))
    ap.add_argument("--quality", default=str(RESULTS / "smollm2"))
    args = ap.parse_args()
    search = Path(args.search)
    rows = searched_rows(search)
    quality = [r for r in json.loads((Path(args.quality) / "quality.json").read_text()) if r.get("metric") == "kl"]
    pareto_plot(quality + rows, search / "frontier.png")
    bitmap_figure(search, rows, search / "bitmap.png")
    for r in rows:
        print(f"budget {r['budget']:g}: bpw {r['bpw']:.3f} KL {r['kl']:.4f}")
    print(f"wrote {search / 'frontier.png'} and {search / 'bitmap.png'}")


if __name__ == "__main__":
    main()
