"""Quality against speed: one table (and, with the plot extra, one plot) over the yardstick's result files.

    python bench/pareto.py bench/results/quality_default_{tasks,turns,long}.json \
        --official bench/results/quality_demo_{tasks,turns}.json bench/results/quality_demo_long_n30.json

Per family (the five tasks, turns 2-4, long answers) and per row (weights, sampler) of bench/quality.py's
JSON: accuracy, tokens per row forward (TPF: output tokens / the forwards each row needed; the official
schedule commits one token a forward), processed tokens per output token, and AUP.

AUP (accuracy under parallelism, after d3LLM): the area under a setting's accuracy-parallelism curve from
the official decode's point (TPF 1, its accuracy y_off) to the setting's (TPF, y), the setting's part
weighted by W(y) = min(1, exp(−3 (1 − y / y_max))), y_max the family's best accuracy, so parallelism
counts only while accuracy holds: AUP = y_off + (TPF − 1) · y · W(y). The official row's AUP is y_off.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

OFFICIAL = ("variable", "exact")  # one token a forward: TPF 1


def family(row: dict) -> str:
    if "gen" in row:
        return "long"
    return "turns" if any(t.startswith("turn") for t in row["per_task"]) else "tasks"


def tpf(row: dict) -> float:
    if row["sampler"] in OFFICIAL:
        return 1.0
    return row.get("tokens_per_row_forward") or float("nan")


def aup(y: float, rho: float, y_off: float, y_max: float) -> float:
    w = min(1.0, math.exp(-3 * (1 - y / y_max))) if y_max > 0 else 0.0
    return y_off + max(rho - 1, 0.0) * y * w


def table(rows: list[dict]) -> list[dict]:
    """One line per (family, weights, sampler) with its AUP; the official row of a family (float32,
    variable or exact) sets y_off."""
    out = []
    for fam in ("tasks", "turns", "long"):
        mine = [r for r in rows if family(r) == fam]
        if not mine:
            continue
        off = next((r for r in mine if r["sampler"] in OFFICIAL and r.get("weights") == "float32"), None)
        y_off = off["accuracy"] if off else max(r["accuracy"] for r in mine)
        y_max = max(r["accuracy"] for r in mine)
        for r in mine:
            rho = tpf(r)
            ppo = r.get("processed_per_output_token")
            out.append(
                {
                    "family": fam,
                    "weights": r.get("weights", "float32"),
                    "sampler": r["sampler"],
                    "n": r["n"],
                    "accuracy": r["accuracy"],
                    "tpf": rho,
                    "processed_per_output_token": ppo,
                    "forwards": r["forwards"],
                    "aup": aup(r["accuracy"], rho, y_off, y_max),
                }
            )
    return out


def markdown(lines: list[dict]) -> str:
    head = "| family | weights | setting | n | accuracy | TPF | processed/out | forwards | AUP |\n" + "|---" * 9 + "|\n"
    body = []
    for x in lines:
        ppo = x["processed_per_output_token"]
        body.append(
            f"| {x['family']} | {x['weights']} | {x['sampler']} | {x['n']} | {100 * x['accuracy']:.1f}% | "
            f"{x['tpf']:.2f} | {'-' if ppo is None else f'{ppo:.1f}'} | {x['forwards']} | {x['aup']:.2f} |\n"
        )
    return head + "".join(body)


def plot(lines: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fams = sorted({x["family"] for x in lines})
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 4), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for x in (x for x in lines if x["family"] == fam):
            size = 20 + 4 * (x["processed_per_output_token"] or 0)
            ax.scatter(x["tpf"], 100 * x["accuracy"], s=size, alpha=0.6)
            ax.annotate(f"{x['sampler']} ({x['weights']})", (x["tpf"], 100 * x["accuracy"]), fontsize=6)
        ax.set(
            title=f"{fam} (marker size: processed tokens per output token)",
            xlabel="tokens per row forward",
            ylabel="exact match (%)",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="bench/quality.py JSON files")
    ap.add_argument(
        "--official",
        nargs="*",
        default=[],
        help="result files to take only the official rows from (float32 variable / exact)",
    )
    ap.add_argument("--out", default="bench/results/pareto", help="writes OUT.md, OUT.json and (plot extra) OUT.png")
    a = ap.parse_args()
    rows = [r for f in a.results for r in json.loads(Path(f).read_text())["rows"]]
    rows += [
        r
        for f in a.official
        for r in json.loads(Path(f).read_text())["rows"]
        if r["sampler"] in OFFICIAL and r.get("weights") == "float32"
    ]
    lines = table(rows)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(lines)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"inputs": a.results, "lines": lines}, indent=2))
    drew = plot(lines, out.with_suffix(".png"))
    print(text + (f"plot: {out.with_suffix('.png')}" if drew else "no plot: pip install -e '.[plot]'"))


if __name__ == "__main__":
    main()
