"""`misalign study plan`'s text: the estimate of misalign.plan (cells, stages, tokens, FLOPs, device-hours,
storage and bytes moved, with and without sharing) as tables a person reads."""

from __future__ import annotations

import math

from misalign.costs import Totals
from misalign.plan import PHASES, ModelPlan, Plan, StagePlan


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def _percent(part: float, whole: float) -> str:
    pct = 100 * part / whole if whole else 0.0
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def _money(x: float | None) -> str:
    return "" if x is None else f"{x:,.2f}"


def _totals_table(rows: dict[str, Totals], title: str, priced: bool) -> list[str]:
    head = f"  {'':<9}{'runs':>7}{'train tokens':>14}{'no-grad tok':>13}{'FLOPs':>11}{'device-h':>11}"
    lines = [title, head + (f"{'money':>12}" if priced else "")]
    for name, t in rows.items():
        line = (f"  {name:<9}{t.runs:>7,}{_si(t.tokens):>14}{_si(t.forward_tokens):>13}{t.flops:>11.3g}"
                f"{_hours(t.device_hours):>11}")
        lines.append(line + (f"{_money(t.money):>12}" if priced else ""))
    return lines


def size_text(n: float) -> str:
    """Bytes in decimal units, as disks and object stores bill them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _storage_table(p: Plan) -> list[str]:
    """Bytes kept until the study ends by kind of file, with and without sharing, and bytes moved per cell."""
    rows = {"shared": "with sharing", "unshared": "no sharing"}
    lines = ["Storage kept until the study ends (adapter-only stages in the parent's dtype)",
             f"  {'':<17}{'adapters':>10}{'full weights':>14}{'evals':>10}{'records':>10}{'total':>10}"]
    for key, label in rows.items():
        b = p.storage[key]
        lines.append(f"  {label:<17}{size_text(b.adapters):>10}{size_text(b.weights):>14}"
                     f"{size_text(b.evals):>10}{size_text(b.records):>10}{size_text(b.total):>10}")
    m = p.moved
    lines += ["", f"Bytes moved per cell (with sharing; {m.cells:,} cells)",
              f"  {'read':>10}{'written':>10}{'per cell':>10}{'max cell':>10}",
              f"  {size_text(m.read):>10}{size_text(m.written):>10}{size_text(m.per_cell):>10}"
              f"{size_text(m.max_per_cell):>10}",
              "  read and written: over the study; per cell: their sum / cells; max cell: one that trains its "
              "whole lineage"]
    return lines


def _stage_summary(stages: list[StagePlan]) -> list[str]:
    """Unique stages grouped by phase and method: what each kind of stage costs."""
    groups: dict[tuple[str, str], list[StagePlan]] = {}
    for s in sorted(stages, key=lambda s: PHASES.index(s.phase)):  # stable: methods stay in the study's order
        groups.setdefault((s.phase, s.method), []).append(s)
    lines = ["Unique stages by phase and method",
             f"  {'phase':<9}{'method':<9}{'stages':>7}{'examples':>11}{'tok/example':>12}{'steps':>11}"
             f"{'FLOPs':>11}{'device-h':>10}{'MFU':>11}{'measured':>10}"]
    for (phase, method), group in groups.items():
        ex = sorted({s.examples for s in group})
        steps = sorted({s.optimizer_steps for s in group})
        span = f"{ex[0]}-{ex[-1]}" if len(ex) > 1 else f"{ex[0]}"
        step_span = f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else f"{steps[0]}"
        tpe = sum(s.tokens_per_example for s in group) / len(group)
        flops = sum(s.flops for s in group)
        hours = sum(s.device_hours for s in group)
        mark = "*" if any(s.examples_assumed for s in group) else ""
        mfus = sorted({round(s.mfu, 3) for s in group})
        mfu = f"{mfus[0]:g}-{mfus[-1]:g}" if len(mfus) > 1 else f"{mfus[0]:g}"
        measured = sum(s.measured_by is not None for s in group)
        lines.append(f"  {phase:<9}{method:<9}{len(group):>7}{span + mark:>11}{tpe:>12.0f}{step_span:>11}"
                     f"{flops:>11.3g}{_hours(hours):>10}{mfu:>11}{f'{measured}/{len(group)}':>10}")
    if any(s.examples_assumed for s in stages):
        lines.append("  * assumed (the data file is unread; see Assumed)")
    lines.append("  MFU: the share of peak each stage is priced at; measured: stages priced from a plan.calibration "
                 "row (the others at plan.mfu: assumed)")
    return lines


def _model_lines(models: list[ModelPlan]) -> list[str]:
    lines = ["Models (built from their configs on the meta device; trainable = with each method's adapter)"]
    for m in models:
        judge = "judge " if m.role == "judge" else ""
        lines.append(f"  {judge}{m.model}: {m.total_params:,} params ({_si(m.total_params)}), {_si(m.matmul_params)} "
                     f"in matmuls; {m.model_type}, {m.layers} layers, d_model {m.d_model}; config: {m.config_from}")
        parts = [f"{k} {_si(v)} ({_percent(v, m.total_params)})" for k, v in m.trainable.items()]
        for i in range(0, len(parts), 4):
            lines.append(("    trainable: " if i == 0 else "               ") + ", ".join(parts[i:i + 4]))
    return lines


def _width_table(p: Plan) -> list[str]:
    """Wall time by trials at once, and the fewest that give the shortest (misalign.schedule)."""
    devices = p.workers_per_trial * p.device_share
    lines = [f"Wall time by trials at once (the grid in order, attacks before their defenses, shared stages "
             f"trained once; {devices:g} device(s) a trial)",
             f"  {'trials':>7}{'devices':>9}{'wall h':>10}{'device-h held':>15}{'busy':>7}"]
    for w in p.widths:
        held = w["held_h"] * devices
        busy = _percent(w["busy_h"], w["held_h"]) if w["held_h"] else "-"
        held_devices = math.ceil(int(w["slots"]) * devices - 1e-9)  # trials sharing a device hold it whole
        lines.append(f"  {int(w['slots']):>7,}{held_devices:>9,}{_hours(w['wall_h']):>10}"
                     f"{_hours(held):>15}{busy:>7}")
    b = p.best_width
    nodes = math.ceil(int(b["slots"]) * devices / p.devices_per_node - 1e-9)
    lines.append(f"  shortest wall time {_hours(b['wall_h'])} h at {int(b['slots']):,} trials at once "
                 f"({nodes:,} node(s) of {p.devices_per_node} device(s)): {_hours(b['held_h'] * devices / p.devices_per_node)}"
                 f" node-hours held, on a cluster that releases idle nodes (start-up and idle timeouts not counted)")
    return lines


def render(p: Plan) -> str:
    """The human table: counts, cost with and without sharing, models, stages, assumptions."""
    a = p.axes
    priced = p.price_per_device_hour is not None
    saved_runs = p.unshared["total"].runs - p.shared["total"].runs
    saved_flops = p.unshared["total"].flops - p.shared["total"].flops
    share = saved_flops / p.unshared["total"].flops if p.unshared["total"].flops else 0.0
    lines = [
        f"Study {p.study}: {a['models']} model(s) x {a['seeds']} seed(s) x {a['attack_points']} attack points x "
        f"{a['defense_points']} defense points = {p.cells:,} cells, {a['rounds']} round(s) each",
        f"Stages: {p.stage_uses:,} uses in the cells, {p.unique_stages:,} unique after sharing "
        f"({p.shared['misalign'].runs:,} misalign + {p.shared['realign'].runs:,} realign); evaluations: "
        f"{p.shared['eval'].runs:,} ({p.unshared['eval'].runs:,} without sharing)",
        f"Device: {p.device}: peak {p.peak_flops:.3g} FLOP/s x "
        + (f"MFU measured per stage shape (plan.calibration {p.calibration}), else the assumed {p.mfu:g}"
           if p.calibration else f"MFU {p.mfu:g} (assumed) = {p.peak_flops * p.mfu:.3g} FLOP/s")
        + (f"; {p.price_per_device_hour:g} per device-hour" if priced else ""),
        "",
        *_totals_table(p.shared, "With sharing (what runs)", priced),
        "",
        *_totals_table(p.unshared, "Without sharing (every cell trains and evaluates its own stages)", priced),
        "",
        f"Sharing saves {saved_runs:,} runs, {saved_flops:.3g} FLOPs ({_percent(share, 1)}), "
        f"{_hours(p.unshared['total'].device_hours - p.shared['total'].device_hours)} device-hours"
        + (f", {_money((p.unshared['total'].money or 0) - (p.shared['total'].money or 0))}" if priced else ""),
        "",
        *_width_table(p),
        "",
        *_storage_table(p),
        "",
        *_model_lines(p.models),
        "",
        *_stage_summary(p.stages),
    ]
    if p.assumptions:
        lines += ["", "Assumed (not measured; the numbers above depend on these):",
                  *(f"  - {x}" for x in p.assumptions)]
    if p.notes:
        lines += ["", "Notes:", *(f"  - {x}" for x in p.notes)]
    return "\n".join(lines)
