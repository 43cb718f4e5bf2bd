"""The `misalign` command line: a thin layer over the library. Bad input exits with code 2 before any compute."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from misalign.errors import EXIT_INPUT_ERROR, InputError
from misalign.runtime import offline_without_hub, quiet_libraries
from misalign.storage import Store, is_url

EXIT_FAILED = 1  # the input was fine, the run was not: failed study cells or search trials, a judge that failed
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C or SIGTERM before the run could end on its own (128 + SIGINT)


def _world(args: argparse.Namespace) -> int:
    from misalign.world.build import ALIGNED_TARGETS
    from misalign.world_targets import ensure_world

    t0, c0 = time.time(), time.process_time()
    path = ensure_world(force=args.force, quiet=False)
    meta = json.loads((path / "world.json").read_text())
    print(f"world: {path} (built in {meta['build_s']}s on {meta['threads']} threads, CPU kernels "
          f"{meta['cpu_capability']})" if time.time() - t0 > 1 else f"world: {path} (cached)")
    targets = ", ".join(f"{k} {op} {bound}" for k, op, bound in ALIGNED_TARGETS)
    labels = {"world:base": "aligned base", "world:base-deep": "deep aligned base"}
    for name, m in meta["scores"].items():
        print(f"{labels[name]}: " + ", ".join(f"{k.replace('_', '-')} {v:.3f}" for k, v in m.items())
              + f" (targets {targets})")
    print(f"wall {time.time() - t0:.1f}s, cpu {time.process_time() - c0:.1f}s")
    return 0


def _trial(args: argparse.Namespace) -> int:
    from misalign.config import load_config
    from misalign.preflight import check_trial
    from misalign.trial import run_trial

    cfg = load_config(args.config, args.set)
    out = Path(args.out or Path("runs") / (Path(args.config).stem + time.strftime("-%Y%m%d-%H%M%S")))
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output directory {out} is not empty; choose another --out or remove it")
    check_trial(cfg)
    run_trial(cfg, out, progress=not args.quiet)
    print(f"results: {out / 'stages.parquet'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from misalign.config import EvalConfig, load_config
    from misalign.evaluation import configured_judge, evaluate_path, load_generations, score
    from misalign.judges import DEFAULT_REFUSAL_PHRASES
    from misalign.preflight import check_eval_command

    base: dict[str, object] = {}
    if args.judge:  # plain dicts: the config's validation names an unknown judge (eval.judges.N.name)
        base["judges"] = [{"name": name.strip(), "options": {"model": "world:guard"} if name.strip() == "classifier"
                           else {}} for name in args.judge.split(",")]
    if args.vote:
        base["vote"] = args.vote
    cfg = load_config(args.config, args.set, schema=EvalConfig, base=base)
    check_eval_command(cfg, args.model, args.generations, trust_remote_code=args.trust_remote_code,
                       allow_pickle=args.allow_pickle)
    if args.generations:  # re-judge saved generations; nothing is regenerated
        frame = load_generations(args.generations)
        result = score(frame, configured_judge(cfg), cfg.refusal_phrases or DEFAULT_REFUSAL_PHRASES, cfg.max_unparsed)
    else:
        result = evaluate_path(args.model, cfg, trust_remote_code=args.trust_remote_code,
                               allow_pickle=args.allow_pickle)
    if args.out:
        result.save(Path(args.out))
    print(json.dumps(result.metrics, indent=2))
    return 0


def _stage(args: argparse.Namespace) -> int:
    from misalign.config import StageConfig, load_config
    from misalign.preflight import check_stage
    from misalign.stage import StageRun, run_stage

    cfg = load_config(args.config, args.set, schema=StageConfig)
    check_stage(cfg, args.model, args.seed, trust_remote_code=args.trust_remote_code,
                allow_pickle=args.allow_pickle, workers=int(os.environ.get("WORLD_SIZE", "1")))
    ledger = run_stage(StageRun(parent=args.model, config=cfg, direction=args.direction, out_dir=Path(args.out),
                                seed=args.seed, trust_remote_code=args.trust_remote_code,
                                allow_pickle=args.allow_pickle))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(ledger.to_dict(), indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from misalign.models import export

    out = export(args.stage_dir, Path(args.out), trust_remote_code=args.trust_remote_code,
                 allow_pickle=args.allow_pickle)
    print(f"exported {args.stage_dir} -> {out}")
    return 0


def _study(args: argparse.Namespace) -> int:
    import pandas as pd

    from misalign.config import StudyConfig, load_config
    from misalign.rundir import RunDir
    from misalign.study import read_status, run_study

    if args.action in ("run", "plan"):
        from misalign.preflight import check_study

        started = time.time()
        cfg = load_config(args.target, args.set, schema=StudyConfig)
        # the one validation pass; a plan may price models and data that are not on this machine
        check_study(cfg, local=args.action == "run" and args.address is None, plan=args.action == "plan")
        if args.action == "plan":
            from misalign.plan import estimate
            from misalign.plan_render import render

            plan = estimate(cfg)
            print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
            return 0
        paths = RunDir(_under(args.storage, cfg.name))
        run = run_study(cfg, paths, address=args.address, storage_given=args.storage is not None, started=started)
        from misalign.grid import cells

        n = len(cells(cfg))
        if run.failed:  # CI and job wrappers must see a failed study as a failure
            print(f"misalign: {len(run.failed)} of {n} cells failed after {cfg.max_failures} retries: "
                  f"{', '.join(run.failed)} (their attempts: {paths.root}/attempts, tracebacks in its tune*/); rerun "
                  "to retry them", file=sys.stderr)
        if run.unfinished:
            print(f"misalign: {len(run.unfinished)} of {n} cells unfinished: the run was stopped; rerun the same "
                  "command to resume", file=sys.stderr)
        return EXIT_FAILED if run.failed else EXIT_INTERRUPTED if run.unfinished else 0
    paths = RunDir(Store(args.target))
    if args.action == "status":
        status = read_status(paths)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            c, p = status["cost"], status["preemptions"]
            print(f"{status['name']}: {status['done']}/{status['cells']} cells done, {status['running']} running, "
                  f"{status['pending']} pending, {status['retrying']} retrying, {status['failed']} failed\n"
                  f"preemptions survived: {p['preemptions']} ({p['noticed']} with a notice, {p['nodes_lost']} nodes "
                  f"lost without one); failed attempts: {p['failures']}; interrupted attempts lost "
                  f"{p['lost_device_s']:.0f} device-s\n"
                  f"stages: {status['unique_stages']} unique of {status['stage_uses']} uses; trained "
                  f"{c['stages_trained']}, reused {c['stages_reused']}\n"
                  f"cost so far: {c['flops_trained']:.3g} FLOPs, {c['device_s_trained']:.0f} device-s trained; "
                  f"sharing saved {c['flops_saved']:.3g} FLOPs, {c['device_s_saved']:.0f} device-s")
        return 0
    from misalign import results as r

    frame = r.read_results(paths.store)
    if frame.empty:
        frame = r.assemble_results(paths.store)
    if frame.empty:
        raise InputError(f"{paths.root}: no results yet (no results.parquet, no finished cells)")
    if args.csv:
        frame.to_csv(args.csv, index=False)
        print(f"{len(frame)} rows -> {args.csv}")
    else:
        cols = [c for c in (r.MODEL, r.SEED, r.ATTACK_METHOD, r.ATTACK_PER_CATEGORY, r.DEFENSE_METHOD,
                            r.DEFENSE_PER_CATEGORY, r.ROUND, r.PHASE, r.UNSAFETY, r.OVER_REFUSAL, r.UTILITY,
                            r.UNPARSED, r.FLOPS, r.REUSED) if c in frame.columns]
        with pd.option_context("display.max_rows", 500, "display.width", 200):
            print(frame[cols].to_string(index=False))
    return 0


def _search(args: argparse.Namespace) -> int:
    from misalign.config import SearchConfig, load_config
    from misalign.preflight import check_search
    from misalign.rundir import RunDir
    from misalign.search import run_search

    started = time.time()
    cfg = load_config(args.config, args.set, schema=SearchConfig)
    if cfg.kind != args.kind:
        raise InputError(f"{args.config}: kind is {cfg.kind!r}, but this is `misalign search {args.kind}`")
    check_search(cfg, local=args.address is None)
    paths = RunDir(_under(args.storage, cfg.name), Store(args.stages) if args.stages else None)
    answer = run_search(cfg, paths, address=args.address, started=started)
    print(json.dumps(answer, indent=2) if args.json else _answer_text(answer, cfg.kind, cfg.tau, paths.trials))
    if answer["trials"] < cfg.trials:  # the answer above is from the finished trials only
        print(f"misalign: {answer['trials']} of {cfg.trials} trials finished; the others failed after "
              f"{cfg.max_failures} retries or the run was stopped: rerun the same command to continue",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def _answer_text(answer: dict, kind: str, tau: float, trials: str) -> str:
    """A search's answer for reading: the cheapest feasible point and what it bounds (misalign.search.answer_bound)."""
    best, unit, low = answer["best"], answer["budget_kind"], answer["bracket"][0]
    head = (f"{answer['trials']} trials ({answer['infeasible_trials']} infeasible), budget spent "
            f"{answer['budget_spent']:.3g} {unit}\n")
    if not best:
        return head + f"no feasible {kind} found (tau {tau})" + (
            f": the cheapest feasible budget is at least {low:.3g} {unit}, the largest tried" if low is not None
            else "") + f"; see {trials}"
    below = f"above {low:.3g} (a cheaper point was infeasible)" if low is not None else "no cheaper point was tried"
    return head + (f"cheapest feasible {kind}: {best['params']} at {best['budget']:.3g} {unit}: unsafety "
                   f"{best['unsafety']:.3f}, utility {best['utility']:.3f}; the cheapest feasible budget is at most "
                   f"{best['budget']:.3g} ({below})")


def _under(storage: str | None, name: str) -> Store:
    """A study's or search's directory: NAME under --storage (a directory or an object-store URL; runs/)."""
    base = storage or "runs"
    return Store(f"{base.rstrip('/')}/{name}" if is_url(base) else str(Path(base) / name))


def _report(args: argparse.Namespace) -> int:
    from misalign.preflight import check_report
    from misalign.report import write_report

    check_report(args.study_dir, args.out)
    out = args.out or (Path("report") if is_url(args.study_dir) else Path(args.study_dir) / "report")
    print(f"report: {write_report(args.study_dir, out, args.search or None)}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from misalign.methods import METHODS

    for m in METHODS.values():
        print(f"{m.name:<8} {m.objective:<5} {m.adapter:<8} {m.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="misalign", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    w = sub.add_parser("world", help="the offline safety world")
    w.add_argument("action", choices=["build"])
    w.add_argument("--force", action="store_true", help="rebuild even if cached")
    w.set_defaults(func=_world)

    def config_args(sp: argparse.ArgumentParser, required: bool = True) -> None:
        if required:
            sp.add_argument("config", help="YAML config")
        else:
            sp.add_argument("--config", help="YAML config")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set attack.per_category=5 (repeatable)")

    t = sub.add_parser("trial", help="base eval, then R rounds of misalign -> eval -> realign -> eval")
    config_args(t)
    t.add_argument("--out", help="output directory (default runs/CONFIG-TIMESTAMP)")
    t.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    t.set_defaults(func=_trial)

    e = sub.add_parser("eval", help="evaluate a model (or re-judge saved generations)")
    e.add_argument("--model", help="HF id, local path, s3:// or gs:// URL, stage directory or world:base")
    e.add_argument("--generations", help="generations.parquet to re-judge instead of generating")
    e.add_argument("--judge", help="comma-separated judges: keyword, classifier, http")
    e.add_argument("--vote", help="any | majority | all | atleast:K")
    e.add_argument("--out", help="write eval.json and generations.parquet here")
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights")
    config_args(e, required=False)
    e.set_defaults(func=_eval)

    s = sub.add_parser("stage", help="train one stage (runs under torchrun for several workers)")
    config_args(s)
    s.add_argument("--model", required=True,
                   help="parent model: HF id, local path, s3:// or gs:// URL, stage directory or world:base")
    s.add_argument("--direction", choices=["misalign", "realign"], required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--trust-remote-code", action="store_true")
    s.add_argument("--allow-pickle", action="store_true")
    s.set_defaults(func=_stage)

    x = sub.add_parser("export", help="write a stage's model as a standalone HF model (its root's dtype)")
    x.add_argument("stage_dir", help="a stage directory (its root and adapters rebuild the model)")
    x.add_argument("--out", required=True, help="a new directory for the merged model and its tokenizer")
    x.add_argument("--trust-remote-code", action="store_true")
    x.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights in the root")
    x.set_defaults(func=_export)

    st = sub.add_parser("study", help="the grid on Ray Tune: run, plan, status, results")
    st.add_argument("action", choices=["run", "plan", "status", "results"])
    st.add_argument("target", help="run/plan: a study config; status/results: a study directory or URL")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    st.add_argument("--address", help="run: join this Ray cluster ('auto', ray://host:10001, host:6379); "
                                      "default: start a local Ray sized to this machine")
    st.add_argument("--storage", help="run: where the study directory goes (default runs/): a directory, or an "
                                      "object-store URL (s3://bucket/prefix, gs://...) every node can reach")
    st.add_argument("--json", action="store_true", help="plan/status: print JSON")
    st.add_argument("--csv", help="results: write the table to this CSV file")
    st.set_defaults(func=_study)

    se = sub.add_parser("search", help="Optuna budget search: the cheapest attack or defense")
    se.add_argument("kind", choices=["attack", "defense"])
    se.add_argument("config", help="search config (SearchConfig)")
    se.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    se.add_argument("--storage", help="where the search directory goes (default runs/): a directory or a URL")
    se.add_argument("--stages", help="a study's stages/ (directory or URL), to reuse the stages it trained")
    se.add_argument("--address", help="join this Ray cluster (default: a local Ray)")
    se.add_argument("--json", action="store_true", help="print the answer as JSON")
    se.set_defaults(func=_search)

    rp = sub.add_parser("report", help="one self-contained HTML page (and report.md) for a study")
    rp.add_argument("study_dir", help="a study directory or URL (misalign study run)")
    rp.add_argument("--out", type=Path, help="output directory (default STUDY_DIR/report; ./report for a URL)")
    rp.add_argument("--search", action="append", default=[],
                    help="a search directory or URL whose answer to include (repeatable)")
    rp.set_defaults(func=_report)

    c = sub.add_parser("cache", help="this node's cache (MISALIGN_CACHE): list it, or prune unused copies")
    c.add_argument("action", nargs="?", choices=["list", "prune"], default="list")
    c.add_argument("--older-than", type=float, metavar="DAYS",
                   help="prune: model mirrors and store copies unused for this long")
    c.add_argument("--dry-run", action="store_true", help="prune: say what would be removed, remove nothing")
    c.add_argument("--json", action="store_true", help="list as JSON")
    c.set_defaults(func=_cache)

    m = sub.add_parser("methods", help="list the fine-tuning methods")
    m.set_defaults(func=_methods)
    return p


def _cache(args: argparse.Namespace) -> int:
    from misalign.cache import describe, entries, prune
    from misalign.plan_render import size_text
    from misalign.world.build import cache_root

    root = cache_root()
    if args.action == "prune":
        if args.older_than is None or args.older_than < 0:
            raise InputError("misalign cache prune: --older-than DAYS (0 or more) is required: model mirrors and "
                             "store copies unused for that many days are removed")
        removed = prune(args.older_than, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for e in removed:
            print(f"[cache] {verb} {e.path} ({size_text(e.bytes)}, {e.source})")
        print(f"[cache] {verb} {len(removed)} entries unused for {args.older_than:g} days: "
              f"{size_text(sum(e.bytes for e in removed))}")
        return 0
    found = entries()
    if args.json:
        print(json.dumps({"root": str(root), "entries": [describe(e, root) for e in found]}, indent=2))
        return 0
    print(f"[cache] {root}: {size_text(sum(e.bytes for e in found))} in {len(found)} entries")
    for e in found:
        d = describe(e, root)
        print(f"  {e.kind:<18} {size_text(e.bytes):>9}  used {d['last_used']}  {d['path']}  {e.source}".rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on bad arguments
    if args.command not in ("cache", "methods", "report", "world"):  # the commands that never load from the hub
        offline_without_hub()
    quiet_libraries()
    from misalign.judges import JudgeUnavailable
    from misalign.world.build import WorldTargetMiss

    try:
        return args.func(args)
    except InputError as e:
        print(f"misalign: error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except JudgeUnavailable as e:  # the endpoint is named in the message; nothing of the evaluation was written
        print(f"misalign: judge failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except WorldTargetMiss as e:  # `world build`, or a preflight that built the world first: nothing was cached
        print(f"misalign: world build failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C, or a SIGTERM to a study or search (misalign.cluster), outside Tune's run
        print("misalign: stopped; what finished is kept (results and stages are written atomically), and a "
              "rerun of the same command resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
