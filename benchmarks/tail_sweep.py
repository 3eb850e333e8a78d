"""Mix-Quant's BF16 tail: the quality/cost frontier from the sweeps `benchmarks/accuracy.py --tails` saved.

    python benchmarks/accuracy.py --tails 1,16,64,256,turn --greedy-tokens 0 [--nvfp4-weights load]
    python benchmarks/accuracy.py --nvfp4-weights load --fp8-tails 1,16,64,256,turn --greedy-tokens 0
    python benchmarks/tail_sweep.py     # tables + KL against BF16 share -> RESULTS.md section and a PNG

Each sweep is saved as benchmarks/tail_sweep/<model>-<key>.json (key: the NVFP4 weights, or fp8). The
cost of a tail is the share of prompt tokens computed in BF16: of all context tokens (measured in the
harness, which reuses no prefix) and of each turn's new tokens (what a session with prefix reuse computes).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAVED = HERE / "tail_sweep"
RESULTS = HERE / "RESULTS.md"
MARK = "tail-sweep"
TARGET_RATIO, TARGET_SHARE = 0.20, 0.10  # issue 12: KL <= 0.20x NVFP4 e2e's with <= 10% of prompt tokens in BF16


def save(model: str, key: str, settings: str, rows: list[dict]) -> Path:
    SAVED.mkdir(exist_ok=True)
    path = SAVED / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}-{key}.json"
    path.write_text(json.dumps({"model": model, "key": key, "settings": settings, "rows": rows}, indent=1))
    return path


def load(model: str | None = None) -> list[dict]:
    sweeps = [json.loads(p.read_text()) for p in sorted(SAVED.glob("*.json"))]
    return [s for s in sweeps if model is None or s["model"] == model]


def _e2e_kl(rows: list[dict]) -> float | None:
    return next((r["kl"] for r in rows if r["prefill"] == r["decode"] == "nvfp4"), None)


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1e4 else f"{value:.3e}"


def table(rows: list[dict]) -> str:
    e2e = _e2e_kl(rows)
    lines = ["| configuration | BF16 share of prompt tokens | BF16 share of new tokens (session reuse) | "
             "KL vs BF16 (mean) | KL / NVFP4 e2e | KL p95 | top-1 agree | ref. PPL | time s |",
             "|" + "---|" * 9]
    for r in rows:
        ratio = f"{r['kl'] / e2e:.3f}" if e2e else "-"
        lines.append(f"| {r['name']} | {r['bf16_share'] * 100:.1f}% | {r['reuse_share'] * 100:.1f}% | "
                     f"{r['kl']:.4f} | {ratio} | {r['kl_p95']:.4f} | {r['top1'] * 100:.1f}% | {_ppl(r['ppl'])} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def pick(rows: list[dict], share: str = "bf16_share") -> dict | None:
    """The smallest Mix-Quant tail meeting the target (KL ratio and BF16 share), else None."""
    e2e = _e2e_kl(rows)
    ok = [r for r in rows if r["prefill"] == "nvfp4" and r["decode"] == "bf16" and e2e
          and r["kl"] <= TARGET_RATIO * e2e and r[share] <= TARGET_SHARE]
    return min(ok, key=lambda r: r[share]) if ok else None


def plot(sweeps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, share, title in ((axes[0], "bf16_share", "of all prompt tokens (no prefix reuse)"),
                             (axes[1], "reuse_share", "of each turn's new tokens (session reuse)")):
        for sweep in sweeps:
            for prefill, marker in (("nvfp4", "o"), ("fp8", "s")):
                rows = [r for r in sweep["rows"] if r["prefill"] == prefill and r["decode"] == "bf16"]
                if not rows:
                    continue
                label = f"{prefill.upper()} prefill ({sweep['key']})"
                line, = ax.plot([r[share] * 100 for r in rows], [r["kl"] for r in rows], marker=marker, label=label)
                for r in rows:
                    ax.annotate(r["tail"], (r[share] * 100, r["kl"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points", color=line.get_color())
            if (e2e := _e2e_kl(sweep["rows"])) is not None:
                ax.axhline(TARGET_RATIO * e2e, ls=":", lw=0.8, color="grey")
        ax.axvline(TARGET_SHARE * 100, ls="--", lw=0.8, color="grey")
        ax.set_xscale("log")
        ax.set_xlim(0.05, 150)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("prompt tokens computed in BF16, %")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("decode-step KL(BF16 || config), nats")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{sweeps[0]['model']}: BF16 tail (labels: tokens) - dotted: 0.20x NVFP4 e2e, dashed: 10%",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def section(sweeps: list[dict], png: str) -> str:
    model = sweeps[0]["model"]
    parts = [f"<!-- {MARK}:{model}:start -->", f"## BF16 tail sweep: {model} (benchmarks/accuracy.py --tails, "
             "benchmarks/tail_sweep.py)", ""]
    for s in sweeps:
        parts += [f"### {s['key']}", "", s["settings"], "", table(s["rows"]), ""]
    parts += [f"![KL against BF16 share]({png})", f"<!-- {MARK}:{model}:end -->", ""]
    return "\n".join(parts)


def write_section(model: str, text: str) -> None:
    start, end = f"<!-- {MARK}:{model}:start -->", f"<!-- {MARK}:{model}:end -->\n"
    old = RESULTS.read_text()
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def main() -> int:
    sweeps = load()
    if not sweeps:
        print(f"no saved sweeps in {SAVED}; run benchmarks/accuracy.py --tails ... first", file=sys.stderr)
        return 1
    for model in dict.fromkeys(s["model"] for s in sweeps):
        mine = load(model)
        png = f"tail_sweep_{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}.png"
        plot(mine, HERE / png)
        write_section(model, section(mine, png))
        for s in mine:
            for share in ("bf16_share", "reuse_share"):
                r = pick(s["rows"], share)
                print(f"{model} {s['key']} target by {share}: " + (f"{r['name']} (KL {r['kl']:.4f}, "
                      f"{r[share] * 100:.1f}%)" if r else "not met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
