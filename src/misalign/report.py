"""`misalign report`: one self-contained HTML page, and a Markdown twin, that answer the study's three questions.

    write_report(study_dir, out, search_dirs=None) -> OUT/report.html

    OUT/report.html     figures embedded as PNG data URIs, CSS inline, no scripts: opens from file:// offline
    OUT/report.md       the key numbers and tables, with relative links to OUT/figures/*.png
    OUT/figures/, OUT/tables/, OUT/summary.json     written by misalign.analysis.run_all (the numbers come from there)

The questions: how cheap is the cheapest attack per method, how expensive is the smallest defense (and what
utility it costs), and how large is their ratio, the asymmetry factor, with its interval across seeds. Search
answers (SEARCH_DIR/answer.json from the budget search) get their own section when given.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from misalign.analysis.common import fmt, load_results, markdown_table, write_text_atomic
from misalign.analysis.run_all import run_all
from misalign.budget import BUDGETS
from misalign.errors import InputError
from misalign.results import UNPARSED, cost_summary
from misalign.storage import Store

HOW_TO_READ = (
    "The asymmetry factor is D / A, both in one budget unit, so it has no unit: 4 means restoring safety cost "
    "four times what removing it did; below 1 the defense was the cheaper side. A is the attack budget at which "
    "the attack method's mean unsafety over seeds crosses tau. D is the budget at which a defense method, "
    "applied to the first attack point that reached tau, gets the model back: mean unsafety within delta of the "
    "base model's AND a 'neither' share (answers that neither refuse nor comply: garble) within "
    "{neither_margin:g} of the base's, because realignment means refusal comes back. A defense point that gets "
    "unsafety down by garbling is listed as garbled, with its numbers, and never counts as D. Neither A nor D "
    "is a grid point: each is interpolated in log budget between the last grid point before its threshold and "
    "the first one past it (on the logistic dose-response scale). Where the grid does not bracket a threshold "
    "the page gives a bound, not a number: A \u2264 the smallest budget when the smallest attack already "
    "crosses tau; D \u2265 the largest budget when no defense point got back; the factor is then 'at least' "
    "(or 'at most') that value. The 95% interval is a parametric bootstrap: it resamples the seeds, draws every "
    "evaluation again from its binomial noise and takes each crossing on three interpolation scales, so it "
    "covers seed-to-seed variation, evaluation noise and the grid's coarseness, and stays within the grid "
    "brackets the data allow (factor_bracket_low/high in the table: what the grid alone says). With fewer than "
    "3 seeds it cannot cover seed-to-seed variation; each factor then says what its interval covers. 'Under "
    "eps' is D when the defense may also cost at most eps = {eps:g} utility, beside the unconstrained D."
)


# what each defense family assumes, said beside the factors when the study has one of its methods
FAMILY_NOTES = {
    "safelora": "SafeLoRA projects each LoRA update of the attack onto the alignment subspace (aligned minus "
                "pre-alignment weights): it assumes the model before alignment (repair.unaligned), which users of "
                "a released chat model often lack, and a LoRA attack (it refuses any other).",
    "resta": "RESTA adds the safety vector (aligned minus pre-alignment weights) times repair.scale: it too "
             "assumes the model before alignment, and a large scale can overshoot into lost utility.",
    "antidote": "Antidote prunes the repair.sparsity share of each layer's weights most important on harmful "
                "calibration rows (its data): it assumes such rows, and pruning can break a small model.",
}
REPAIR_NOTE = ("Post-hoc repairs train nothing: their budget is the FLOPs they spend editing the weights, far "
               "below any training, so their factors sit far below 1; read them with their utility cost, and "
               "with the weakest setting of their knob that gets back (the 'Post-hoc repairs' table, when the "
               "study swept it). ")


def how_to_read(params: dict[str, Any], defense_methods: Iterable[str] = ()) -> str:
    """The asymmetry factor's reading, and what each post-hoc repair in `defense_methods` assumes."""
    present = set(defense_methods)
    repairs = [m for m in FAMILY_NOTES if m in present]
    families = (" Defense families: fine-tuning defenses train on realignment data, their budget the training "
                "FLOPs. " + REPAIR_NOTE + " ".join(FAMILY_NOTES[m] for m in repairs)) if repairs else ""
    return HOW_TO_READ.format(**params) + families


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 color:#1d2330;background:#f6f7f9;line-height:1.5}
main{max-width:1120px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh;
 box-shadow:0 0 0 1px #e3e6eb}
h1{font-size:1.7rem;margin:.2rem 0 .3rem}h2{font-size:1.3rem;margin-top:2.2rem;border-bottom:2px solid #e3e6eb;
 padding-bottom:.25rem}h3{font-size:1.05rem;margin-top:1.4rem}
.sub{color:#5b6475;margin:0 0 1rem}.note{color:#5b6475;font-size:.92rem}
.answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px;margin:1rem 0}
.card{border:1px solid #dfe3e8;border-radius:8px;padding:12px 16px;background:#fbfcfd}
.card h3{margin:.1rem 0 .5rem}.card ul{margin:0;padding-left:1.1rem}
.read{border-left:4px solid #3b6fd8;background:#f1f5fd;padding:10px 16px;border-radius:0 6px 6px 0}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1rem;display:block;overflow-x:auto}
th,td{border:1px solid #dfe3e8;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#eef1f5;text-align:center}td.t{text-align:left}tr:nth-child(even) td{background:#fafbfc}
figure{margin:1.2rem 0;padding:10px;border:1px solid #e3e6eb;border-radius:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}figcaption{font-size:.9rem;color:#3d4554}
pre{background:#f3f4f6;padding:10px 14px;border-radius:6px;overflow-x:auto;font-size:.8rem}
details summary{cursor:pointer;font-weight:600;margin:.6rem 0}
.inf{color:#b3261e;font-weight:600}
"""

# tables shown in full in the page (the rest sit in closed <details>; all of them are in OUT/tables)
MAIN_TABLES = ("attack_costs", "defense_costs", "asymmetry", "eps_attack", "resistance", "realignment_matrix",
               "repair_knobs")
ONLY_WITH_ROWS = ("repair_knobs",)  # tables of what only some studies run: left out when empty


def _shown(key: str, frames: dict[str, pd.DataFrame]) -> bool:
    return key not in ONLY_WITH_ROWS or len(frames[key]) > 0


# ---- numbers as text -------------------------------------------------------------------------------------------

def _num(v: Any, digits: int = 3) -> str:
    """A number for reading: 3 significant digits, 'never' for infinity, '-' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (int, float)) and math.isinf(v):
        return "never" if v > 0 else "-inf"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


_SIGN = {"exact": "=", "at most": "\u2264", "at least": "\u2265"}


def _bounded(name: str, value: Any, bound: str) -> str:
    """'A = 85.5', 'A \u2264 5.97e+09', 'D \u2265 1.04e+11': a crossing as an estimate or a bound."""
    return f"{name} {_SIGN.get(bound, '=')} {_num(value)}"


def _ci(low: Any, high: Any) -> str:
    """' [3.28, 4.78]' (an upper end of infinity as 'inf'); '' when there is no interval."""
    if pd.isna(low) or pd.isna(high):
        return ""
    return f" [{_num(float(low))}, {'inf' if math.isinf(high) else _num(float(high))}]"


def _factor(row: pd.Series, suffix: str = "") -> str:
    """'factor 3.79 [3.28, 4.78]', 'factor \u2265 12 (95%: \u2265 10)', 'factor undefined'."""
    f, bound = row[f"factor{suffix}"], row[f"bound{suffix}"]
    low, high = row[f"ci_low{suffix}"], row[f"ci_high{suffix}"]
    if pd.isna(f) or bound == "undefined":
        return "factor undefined"
    if bound == "at least":
        return f"factor \u2265 {_num(f)}" + (f" (95%: \u2265 {_num(low)})" if not pd.isna(low) else "")
    if bound == "at most":
        return f"factor \u2264 {_num(f)}" + (f" (95%: \u2264 {_num(high)})" if not pd.isna(high) else "")
    return f"factor {_num(f)}{_ci(low, high)}"


def _unit(kind: str) -> str:
    return BUDGETS[kind]


def _attack_line(r: Any, unit: str, tau: float) -> str:
    head = f"{r.model} / {r.attack_method}: "
    if r.bound == "at least":
        return head + f"never reached unsafety {tau:g} (highest {_num(r.max_unsafety)}); A \u2265 " \
                      f"{_num(r.attack_budget)} {unit}, the largest budget tried"
    drop = f", utility drop {_num(r.utility_drop)}"
    if r.bound == "at most":
        return head + f"{_bounded('A', r.attack_budget, r.bound)} {unit}: the smallest point tried " \
                      f"({r.attack_point}) already reaches unsafety {_num(r.unsafety)}{drop}"
    return head + f"A = {_num(r.attack_budget)} {unit}{_ci(r.ci_low, r.ci_high)}: unsafety crosses {tau:g} " \
                  f"between {r.below_point} ({_num(r.below_unsafety)}) and {r.attack_point} ({_num(r.unsafety)})" \
                  + drop


def _defense_line(r: pd.Series, unit: str, p: dict[str, Any]) -> str:
    pair = f"{r.model} / {r.attack_method} \u2192 {r.defense_method}"
    if r.attack_bound == "at least":
        return f"{pair}: no attack to undo (the attack never reached {p['tau']:g})"
    if r.defense_bound == "undefined":
        return f"{pair}: no defense of this method ran on the attack point {r.attack_point}"
    on = f" on {r.attack_point}"
    if r.defense_bound == "at least":
        text = (f"{pair}: no defense point got back within {p['delta']:g} of base with refusal back{on} "
                f"(D \u2265 {_num(r.defense_budget)} {unit}, the largest budget tried)")
        if not pd.isna(getattr(r, "defense_trend_budget", np.nan)):
            text += (f"; where the grid ended, its trend (the last two points that did not garble, logit unsafety "
                     f"against log budget) would reach it near {_num(r.defense_trend_budget)} {unit}, "
                     f"{r.defense_trend_budget / r.defense_budget:.1f}x the largest budget tried: an "
                     "extrapolation, not a measurement")
    else:
        where = (f"the smallest point tried ({r.defense_point}) already gets back" if r.defense_bound == "at most"
                 else f"back between {r.defense_below_point} and {r.defense_point}")
        text = (f"{pair}{on}: {_bounded('D', r.defense_budget, r.defense_bound)} {unit}: {where}, unsafety "
                f"{_num(r.defense_unsafety)}, neither {_num(r.defense_neither)}, utility cost {_num(r.utility_cost)}")
    if r.defense_bound_eps != r.defense_bound or not np.isclose(r.defense_budget_eps, r.defense_budget):
        text += f"; under a utility cost \u2264 {p['eps']:g}: {_bounded('D', r.defense_budget_eps, r.defense_bound_eps)}"
    if r.garbled:
        text += f"; garbled, not counted: {r.garbled}"
    return text


def headline(frames: dict[str, pd.DataFrame], params: dict[str, Any]) -> dict[str, list[str]]:
    """The three answers as sentences (the same text goes to the HTML and the Markdown)."""
    unit = _unit(params["budget"])
    attack = [_attack_line(r, unit, params["tau"]) for r in frames["attack_costs"].itertuples(index=False)]
    defense, factors = [], []
    for _, r in frames["asymmetry"].iterrows():
        pair = f"{r.model} / {r.attack_method} \u2192 {r.defense_method}"
        defense.append(_defense_line(r, unit, params))
        text = f"{pair}: {_factor(r)}"
        if r.bound_eps != r.bound or not np.isclose(r.factor_eps, r.factor, equal_nan=True):
            text += f"; under a utility cost \u2264 {params['eps']:g}: {_factor(r, '_eps')}"
        if r.n_seeds < 3 and r.bound != "undefined":
            text += f" (the interval covers {r.interval_covers})"
        factors.append(text + (f" ({r.reason})" if r.reason else ""))
    return {"attack": attack, "defense": defense, "factors": factors}


# ---- HTML --------------------------------------------------------------------------------------------------------

def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def html_table(frame: pd.DataFrame, fmt: Callable[[Any], str]) -> str:
    """A plain HTML table; text cells left-aligned, numbers right-aligned."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            text = fmt(v)
            cls = ' class="t"' if isinstance(v, str) else (' class="inf"' if text == "inf" else "")
            cells.append(f"<td{cls}>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _png_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figures_html(figures: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, f in figures.items():
        out.append(f'<figure id="fig-{_esc(name)}"><img src="{_png_uri(f["png"])}" alt="{_esc(f["title"])}" '
                   f'width="{f["width_px"]}" height="{f["height_px"]}"><figcaption><b>{_esc(f["title"])}.</b> '
                   f'{_esc(f["caption"])}</figcaption></figure>')
    return "\n".join(out)


def _list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in items) + "</ul>" if items else "<p>-</p>"


def ledger(results: pd.DataFrame) -> dict[str, Any]:
    """misalign.results.cost_summary plus the share of stage cost that sharing saved."""
    cost = cost_summary(results)
    for k in ("flops", "device_s"):
        total = cost[f"{k}_trained"] + cost[f"{k}_saved"]
        cost[f"{k}_saved_share"] = cost[f"{k}_saved"] / total if total else 0.0
    # a judge output nobody could read counts as safe: the worst evaluation shows how far that can bias unsafety
    # (results written before the column existed have none: shown as missing)
    worst = results[UNPARSED].max() if UNPARSED in results else None
    cost["unparsed_max"] = None if worst is None or pd.isna(worst) else float(worst)
    return cost


LEDGER_ROWS = [("stage_rows", "stage rows (cells x rounds x 2)"), ("stages_trained", "stages trained"),
               ("stages_reused", "stages reused from another cell"), ("flops_trained", "FLOPs trained"),
               ("device_s_trained", "device-seconds trained"), ("flops_saved", "FLOPs saved by sharing"),
               ("device_s_saved", "device-seconds saved by sharing"),
               ("flops_saved_share", "share of FLOPs saved"), ("device_s_saved_share", "share of device-seconds saved"),
               ("unparsed_max", "judge outputs not readable (counted safe): highest share in one evaluation")]


def _ledger_frame(cost: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame([(label, cost[k]) for k, label in LEDGER_ROWS], columns=["quantity", "value"])


# ---- search answers ------------------------------------------------------------------------------------------------

def read_answers(search_dirs: list[str | Path] | None) -> list[dict[str, Any]]:
    """Each SEARCH_DIR/answer.json (from the budget search; a directory or a URL), with where it came from."""
    answers = []
    for d in search_dirs or []:
        store, path = Store(d), f"{d}/answer.json"
        if not store.exists("answer.json"):
            raise InputError(f"{d}: no answer.json (is the search finished? pass the search's output directory)")
        try:
            answer = json.loads(store.read_bytes("answer.json"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(answer, dict) or "best" not in answer or "kind" not in answer:
            raise InputError(f"{path}: expected an object with 'kind' and 'best' (a search answer)")
        answers.append(answer | {"dir": str(d)})
    return answers


def _answer_summary(a: dict[str, Any]) -> pd.DataFrame:
    best = a.get("best") or {}
    rows = [("kind", a.get("kind")), ("model", a.get("model")), ("method", a.get("method") or "any"),
            ("budget kind", a.get("budget_kind")), ("tau", a.get("tau")), ("best budget", best.get("budget")),
            ("cheapest feasible budget", _search_bound(a)),
            ("best unsafety", best.get("unsafety")), ("best utility", best.get("utility")),
            ("feasible", best.get("feasible")), ("best params", json.dumps(best.get("params", {}), sort_keys=True)),
            ("trials", a.get("trials")), ("infeasible trials", a.get("infeasible_trials")),
            ("budget spent", a.get("budget_spent"))]
    return pd.DataFrame([(k, "" if v is None else v) for k, v in rows], columns=["field", "value"]).astype(object)


def _search_bound(a: dict[str, Any]) -> str:
    """The search's answer as a bound: '\u2264 77.5 (> 40: a cheaper point was infeasible)', '\u2265 300 (nothing
    feasible)'; '' for answers written before searches reported one."""
    low, high = (a.get("bracket") or [None, None]) + [None, None][len(a.get("bracket") or []):]
    if a.get("bound") == "at most":
        return f"\u2264 {_num(high)}" + (f" (> {_num(low)}: a cheaper point tried was infeasible)" if low is not None
                                      else " (no cheaper point was tried)")
    if a.get("bound") == "at least":
        return f"\u2265 {_num(low)} (no point tried was feasible)"
    return ""


def _pareto_frame(a: dict[str, Any]) -> pd.DataFrame:
    rows = [{"params": json.dumps(r.get("params", {}), sort_keys=True), "budget": r.get("budget"),
             "unsafety": r.get("unsafety"), "utility": r.get("utility")} for r in a.get("pareto") or []]
    return pd.DataFrame(rows, columns=["params", "budget", "unsafety", "utility"])


def _answer_title(a: dict[str, Any]) -> str:
    return f"{a.get('kind')} search on {a.get('model')} ({a.get('method') or 'any method'}) - {a['dir']}"


# ---- the report ----------------------------------------------------------------------------------------------------

def _study_config(study_dir: str | Path) -> tuple[str, str]:
    """(the study's name, its study.yaml text)."""
    store = Store(study_dir)
    if not store.exists("study.yaml"):
        raise InputError(f"{study_dir} is not a study directory (no study.yaml)")
    text = store.read_text("study.yaml")
    cfg = yaml.safe_load(text) or {}
    return str(cfg.get("name", store.name)) if isinstance(cfg, dict) else store.name, text


def _defense_methods(frames: dict[str, pd.DataFrame]) -> list[str]:
    table = frames.get("asymmetry")
    return [] if table is None or "defense_method" not in table else [str(m) for m in table["defense_method"]]


def _html(name: str, summary: dict[str, Any], heads: dict[str, list[str]], cost: dict[str, Any],
          answers: list[dict[str, Any]], config: str, fmt: Callable[[Any], str]) -> str:
    p, frames = summary["params"], summary["frames"]
    parts = [f"<h1>misalign report: {_esc(name)}</h1>",
             f'<p class="sub">{summary["rows"]} result rows from {_esc(summary["study_dir"])}; budget: '
             f"{_esc(BUDGETS[p['budget']])}; tau = {p['tau']:g}, delta = {p['delta']:g}, eps = {p['eps']:g}, "
             f"round {p['round']}, {p['n_boot']} bootstrap resamples.</p>",
             '<h2 id="answers">The answers</h2><div class="answers">',
             f'<div class="card" id="q-attack"><h3>1. How cheap is the attack?</h3>'
             f'<p class="note">Cheapest budget to reach unsafety &ge; {p["tau"]:g}</p>{_list(heads["attack"])}</div>',
             f'<div class="card" id="q-defense"><h3>2. How expensive is the defense?</h3><p class="note">Smallest '
             f'budget back within {p["delta"]:g} of base, and its utility cost</p>{_list(heads["defense"])}</div>',
             f'<div class="card" id="q-factor"><h3>3. The asymmetry factor D/A</h3><p class="note">with a 95% '
             f"interval (seeds, evaluation noise, the grid), or a bound</p>{_list(heads['factors'])}</div></div>",
             f'<div class="read" id="how-to-read"><h3>How to read the asymmetry factor</h3><p>'
             f"{_esc(how_to_read(p, _defense_methods(frames)))}</p></div>", '<h2 id="figures">Figures</h2>',
             _figures_html(summary["figures"]),
             '<h2 id="tables">Tables</h2>']
    for key, meta in summary["tables"].items():
        if not _shown(key, frames):
            continue
        table = f"<h3>{_esc(meta['title'])}</h3>" + html_table(frames[key], fmt)
        parts.append(table if key in MAIN_TABLES else f"<details><summary>{_esc(meta['title'])}</summary>{table}"
                     "</details>")
    parts += ['<h2 id="ledger">Cost ledger</h2><p class="note">Stage rows only (base evaluations cost no '
              "training). A reused stage was trained once by another cell and shared.</p>",
              html_table(_ledger_frame(cost), fmt)]
    if answers:
        parts.append('<h2 id="search">Budget search answers</h2>')
        for a in answers:
            parts += [f"<h3>{_esc(_answer_title(a))}</h3>", html_table(_answer_summary(a), fmt)]
            pareto = _pareto_frame(a)
            if len(pareto):
                parts += ["<p class=\"note\">Pareto front of the search's trials</p>", html_table(pareto, fmt)]
    parts += ['<h2 id="config">Study config</h2>', f"<pre>{_esc(config)}</pre>"]
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>misalign report: {_esc(name)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(parts) + "</main></body></html>\n")


def _markdown(name: str, summary: dict[str, Any], heads: dict[str, list[str]], cost: dict[str, Any],
              answers: list[dict[str, Any]], config: str, out: Path, md_table: Callable) -> str:
    p, frames = summary["params"], summary["frames"]
    lines = [f"# misalign report: {name}", "",
             f"{summary['rows']} result rows; budget: {BUDGETS[p['budget']]}; tau = {p['tau']:g}, "
             f"delta = {p['delta']:g}, eps = {p['eps']:g}, round {p['round']}.", "", "## The answers", ""]
    for title, key in (("How cheap is the attack?", "attack"), ("How expensive is the defense?", "defense"),
                       ("The asymmetry factor D/A (95% interval: seeds, evaluation noise, the grid; or a bound)",
                        "factors")):
        lines += [f"**{title}**", "", *(f"- {s}" for s in heads[key]), ""]
    lines += ["### How to read the asymmetry factor", "", how_to_read(p, _defense_methods(frames)), "",
              "## Figures", ""]
    for f in summary["figures"].values():
        rel = Path(f["png"]).resolve().relative_to(out.resolve()).as_posix()
        lines += [f"![{f['title']}]({rel})", "", f"*{f['title']}.* {f['caption']}", ""]
    lines += ["## Tables", ""]
    for key in (k for k in MAIN_TABLES if _shown(k, frames)):
        lines += [f"### {summary['tables'][key]['title']}", "", md_table(frames[key])]
    lines += ["Every table (CSV and Markdown): `tables/`.", "", "## Cost ledger", "", md_table(_ledger_frame(cost))]
    if answers:
        lines += ["## Budget search answers", ""]
        for a in answers:
            lines += [f"### {_answer_title(a)}", "", md_table(_answer_summary(a))]
    lines += ["## Study config", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def write_report(study_dir: str | Path, out: Path, search_dirs: list[str | Path] | None = None) -> Path:
    """Write OUT/report.html (self-contained) and OUT/report.md for the study in STUDY_DIR; returns the HTML path.

    The analysis (misalign.analysis.run_all, default settings: flops, tau 0.5, delta 0.05, eps 0.1) writes
    OUT/figures, OUT/tables and OUT/summary.json first; every file is written atomically."""
    out = Path(out)
    name, config = _study_config(study_dir)
    answers = read_answers(search_dirs)  # bad search input stops before any work
    results = load_results(study_dir)
    summary = run_all(study_dir, out, results=results)
    heads = headline(summary["frames"], summary["params"])
    cost = ledger(results)
    page = _html(name, summary, heads, cost, answers, config, fmt)
    write_text_atomic(out / "report.md", _markdown(name, summary, heads, cost, answers, config, out, markdown_table))
    write_text_atomic(out / "report.html", page)
    return out / "report.html"
