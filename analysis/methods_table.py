"""The offline world's counterpart of the paper's Table 5: every method as the attack and as the defense.

    python analysis/methods_table.py                      # 7 methods x sizes 1,3,10 x 2 seeds, then defenses
    python analysis/methods_table.py --methods lora,orpo --sizes 3 --seeds 0   # a slice

Attack: each method misaligns the aligned base (world:base) on world:misalign with N examples per category.
Defense: each method realigns the same misaligned model (LoRA attack, --defense-from-size per category, same
seed) on world:realign plus its benign share. Every stage uses the method's registry defaults (configs can
override them; see README). Writes OUT/rows.parquet (one row per stage) and OUT/table.md (mean +- sd over seeds).
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


def _stage(method: str, source: str, per_category: int, benign: bool) -> StageConfig:
    data = {"source": source, "per_category": per_category}
    if benign:
        data |= {"benign_source": "world:benign", "benign_ratio": 1.0}
    return StageConfig(method=method, data=data)


def _mean_sd(s: pd.Series) -> str:
    return f"{s.mean():.2f} ± {s.std(ddof=1):.2f}" if len(s) > 1 else f"{s.mean():.2f}"


def markdown(rows: pd.DataFrame) -> str:
    lines = []
    base = rows[rows.role == "base"].iloc[0]
    lines.append(f"Aligned base: unsafety {base.unsafety:.2f}, utility {base.utility:.2f}, "
                 f"over-refusal {base.over_refusal:.2f}.\n")
    att = rows[rows.role == "attack"]
    sizes = sorted(att.per_category.unique())
    head = (["method"] + [f"unsafety @{s}/cat" for s in sizes]
            + [f"{k} @{sizes[-1]}" for k in ("neither", "utility", "over-refusal")])
    lines += ["**Attack** (misalign the aligned base; mean ± sd over seeds)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        g = att[att.method == m]
        if g.empty:
            continue
        big = g[g.per_category == sizes[-1]]
        cells = [_mean_sd(g[g.per_category == s].unsafety) for s in sizes]
        tail = [_mean_sd(big.neither), _mean_sd(big.utility), _mean_sd(big.over_refusal)]
        lines.append("| " + " | ".join([m, *cells, *tail]) + " |")
    de = rows[rows.role == "defense"]
    if not de.empty:
        mis = rows[rows.role == "misaligned"]
        lines += ["", f"**Defense** (realign a LoRA-misaligned model: unsafety {_mean_sd(mis.unsafety)}, "
                  f"utility {_mean_sd(mis.utility)})", "",
                  "| method | unsafety | utility | over-refusal | neither |", "|---|---|---|---|---|"]
        for m in METHODS:
            g = de[de.method == m]
            if not g.empty:
                lines.append(f"| {m} | {_mean_sd(g.unsafety)} | {_mean_sd(g.utility)} | "
                             f"{_mean_sd(g.over_refusal)} | {_mean_sd(g.neither)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--defenses", default=None, help="defense methods (default: --methods)")
    ap.add_argument("--sizes", default="1,3,10", help="attack examples per category")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--defense-size", type=int, default=10, help="defense examples per category")
    ap.add_argument("--defense-from-size", type=int, default=10, help="the LoRA attack size defended against")
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
    methods, sizes = args.methods.split(","), [int(s) for s in args.sizes.split(",")]
    defenses = (args.defenses or args.methods).split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    ecfg = EvalConfig()
    items, judge = load_eval_sets(ecfg), configured_judge(ecfg)
    rows: list[dict] = []

    def record(role: str, method: str | None, per_category: int, seed: int, model: str, ledger: Ledger | None = None) -> None:
        ev = evaluate(materialize(model), tokenizer_for(model), ecfg, items, judge)  # a stage: built in memory
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
    record("base", None, 0, 0, "world:base")
    for seed in seeds:
        for method in methods:
            for size in sizes:
                d = work / f"attack-{method}-{size}-s{seed}"
                ledger = run_stage(StageRun("world:base", _stage(method, "world:misalign", size, False), "misalign",
                                            d, seed=seed, progress=False))
                record("attack", method, size, seed, str(d), ledger)
        mis = work / f"attack-lora-{args.defense_from_size}-s{seed}"
        if not (mis / "stage.json").exists():
            ledger = run_stage(StageRun("world:base", _stage("lora", "world:misalign", args.defense_from_size,
                                                             False), "misalign", mis, seed=seed, progress=False))
        record("misaligned", "lora", args.defense_from_size, seed, str(mis))
        for method in defenses:
            d = work / f"defense-{method}-s{seed}"
            ledger = run_stage(StageRun(str(mis), _stage(method, "world:realign", args.defense_size, True),
                                        "realign", d, seed=seed, progress=False))
            record("defense", method, args.defense_size, seed, str(d), ledger)
    table = markdown(pd.DataFrame(rows))
    (out / "table.md").write_text(table)
    print(table)
    print(f"{len(rows)} evaluations in {time.time() - t0:.0f}s -> {out}")


if __name__ == "__main__":
    main()
