"""The offline world's counterpart of the paper's Table 5: every method as the attack and as the defense.

    python analysis/methods_table.py                      # 7 methods x sizes 0.25,1,4 x 2 seeds, then defenses
    python analysis/methods_table.py --methods lora,orpo --sizes 3 --seeds 0   # a slice
    python analysis/methods_table.py --base world:base-deep --defenses none --out runs/methods-table-deep

Attack: each method misaligns the aligned base (--base, world:base) on world:misalign with N examples per category.
Defense: each method realigns the same misaligned model (LoRA attack, --defense-from-size per category, same
seed) on world:realign plus its benign share, at each --defense-sizes. Every stage uses the method's registry
defaults (configs can override them; see README). Writes OUT/rows.parquet (one row per stage) and OUT/table.md
(mean +- sd over seeds; 'neither @0.5' is 'neither' at the smallest size whose mean unsafety reaches 0.5).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from misalign.config import EvalConfig, StageConfig
from misalign.evaluation import configured_judge, evaluate, load_eval_sets
from misalign.ledger import Ledger
from misalign.methods import METHODS
from misalign.models import materialize, tokenizer_for
from misalign.runtime import match_threads, write_parquet_atomic
from misalign.stage import StageRun, run_stage


def _size(text: str) -> float:
    """An examples-per-category size as given: a whole number stays an int (the stage's cache key), 0.25 a float."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _stage(method: str, source: str, per_category: float, benign: bool) -> StageConfig:
    data = {"source": source, "per_category": per_category}
    if benign:
        data |= {"benign_source": "world:benign", "benign_ratio": 1.0}
    return StageConfig(method=method, data=data)


def _mean_sd(s: pd.Series) -> str:
    return f"{s.mean():.2f} ± {s.std(ddof=1):.2f}" if len(s) > 1 else f"{s.mean():.2f}"


def _smallest_reaching(g: pd.DataFrame, sizes: list[int], tau: float = 0.5) -> tuple[str, str]:
    for size in sizes:
        at = g[g.per_category == size]
        if not at.empty and at.unsafety.mean() >= tau:
            return f"{size:g}/cat", _mean_sd(at.neither)
    return "never", "-"


def markdown(rows: pd.DataFrame) -> str:
    lines = []
    base = rows[rows.role == "base"]
    lines.append(f"Aligned base ({base.iloc[0].method or 'world:base'}): unsafety {base.unsafety.mean():.2f}, "
                 f"utility {base.utility.mean():.2f}, over-refusal {base.over_refusal.mean():.2f}, "
                 f"neither {base.neither.mean():.2f}.\n")
    att = rows[rows.role == "attack"]
    sizes = sorted(att.per_category.unique())
    head = (["method"] + [f"unsafety @{s:g}/cat" for s in sizes] + ["reaches 0.5 at", "neither @0.5"]
            + [f"{k} @{sizes[-1]:g}" for k in ("neither", "utility", "over-refusal")])
    lines += ["**Attack** (misalign the aligned base; mean ± sd over seeds)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        g = att[att.method == m]
        if g.empty:
            continue
        big = g[g.per_category == sizes[-1]]
        cells = [_mean_sd(g[g.per_category == s].unsafety) for s in sizes]
        tail = [_mean_sd(big.neither), _mean_sd(big.utility), _mean_sd(big.over_refusal)]
        lines.append("| " + " | ".join([m, *cells, *_smallest_reaching(g, sizes), *tail]) + " |")
    de = rows[rows.role == "defense"]
    if not de.empty:
        mis = rows[rows.role == "misaligned"]
        dsizes = sorted(de.per_category.unique())
        head = (["method"] + [f"unsafety @{s:g}/cat" for s in dsizes]
                + [f"{k} @{dsizes[-1]:g}" for k in ("utility", "over-refusal", "neither")])
        lines += ["", f"**Defense** (realign a LoRA-misaligned model, {mis.per_category.iloc[0]:g}/cat: unsafety "
                  f"{_mean_sd(mis.unsafety)}, neither {_mean_sd(mis.neither)}, utility {_mean_sd(mis.utility)})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in METHODS:
            g = de[de.method == m]
            if not g.empty:
                big = g[g.per_category == dsizes[-1]]
                cells = [_mean_sd(g[g.per_category == s].unsafety) for s in dsizes]
                tail = [_mean_sd(big.utility), _mean_sd(big.over_refusal), _mean_sd(big.neither)]
                lines.append("| " + " | ".join([m, *cells, *tail]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--defenses", default=None, help="defense methods (default: --methods)")
    ap.add_argument("--base", default="world:base", help="the aligned model attacked (world:base-deep: the deep one)")
    ap.add_argument("--sizes", default="0.25,1,4", help="attack examples per category (0.25: 3 rows of 13 categories)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--defense-sizes", default="1,3,10", help="defense examples per category")
    ap.add_argument("--defense-from-size", type=_size, default=1, help="the LoRA attack size defended against")
    ap.add_argument("--out", default="runs/methods-table")
    ap.add_argument("--render-only", action="store_true", help="rewrite OUT/table.md from OUT/rows.parquet")
    args = ap.parse_args()
    out = Path(args.out)
    if args.render_only:
        table = markdown(pd.read_parquet(out / "rows.parquet"))
        (out / "table.md").write_text(table)
        print(table)
        return
    match_threads()
    work = out / "stages"
    methods, sizes = args.methods.split(","), [_size(s) for s in args.sizes.split(",")]
    defenses = [d for d in (args.defenses or args.methods).split(",") if d != "none"]
    dsizes = [_size(s) for s in args.defense_sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    ecfg = EvalConfig()
    items, judge = load_eval_sets(ecfg), configured_judge(ecfg)
    rows: list[dict] = []

    def record(role: str, method: str | None, per_category: int, seed: int, model_dir: str, ledger: Ledger | None = None) -> None:
        # a stage directory is rebuilt in memory from its root and adapters (no merged copy is stored)
        ev = evaluate(materialize(model_dir), tokenizer_for(model_dir), ecfg, items, judge)
        m = ev.metrics
        rows.append({"role": role, "method": method, "per_category": per_category, "seed": seed,
                     **{k: m.get(k) for k in ("unsafety", "refusal", "neither", "over_refusal", "utility")},
                     "tokens": ledger.tokens if ledger else 0, "flops": ledger.flops if ledger else 0,
                     "wall_s": ledger.wall_s if ledger else 0})
        write_parquet_atomic(out / "rows.parquet", pd.DataFrame(rows))
        print(f"{role:<10} {method or '-':<8} {per_category:>3}/cat seed {seed}: unsafety {m['unsafety']:.2f} "
              f"neither {m['neither']:.2f} utility {m['utility']:.2f} over-refusal {m['over_refusal']:.2f}",
              flush=True)

    t0 = time.time()
    record("base", args.base, 0, 0, args.base)
    for seed in seeds:
        for method in methods:
            for size in sizes:
                d = work / f"attack-{method}-{size}-s{seed}"
                ledger = run_stage(StageRun(args.base, _stage(method, "world:misalign", size, False), "misalign",
                                            d, seed=seed, progress=False))
                record("attack", method, size, seed, str(d), ledger)
        mis = work / f"attack-lora-{args.defense_from_size}-s{seed}"
        if not defenses:
            continue
        if not (mis / "stage.json").exists():
            run_stage(StageRun(args.base, _stage("lora", "world:misalign", args.defense_from_size, False),
                               "misalign", mis, seed=seed, progress=False))
        record("misaligned", "lora", args.defense_from_size, seed, str(mis))
        for method in defenses:
            for size in dsizes:
                d = work / f"defense-{method}-{size}-s{seed}"
                ledger = run_stage(StageRun(str(mis), _stage(method, "world:realign", size, True),
                                            "realign", d, seed=seed, progress=False))
                record("defense", method, size, seed, str(d), ledger)
    table = markdown(pd.DataFrame(rows))
    (out / "table.md").write_text(table)
    print(table)
    print(f"{len(rows)} evaluations in {time.time() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    main()
