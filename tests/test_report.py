"""The report: rendered for a hand-made study (known answers) and for a small real one (study-tiny's results),
then opened in a real headless Chromium: every figure loads, nothing is fetched, no console errors, and the
headline numbers are on the page."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from analysis_tables import study_table  # the hand-made results tables with known answers
from misalign.errors import InputError
from misalign.report import FAMILY_NOTES, how_to_read, write_report

FIXTURE = Path(__file__).parent / "fixtures" / "study-tiny"  # results of `make study` (configs/study-tiny.yaml)
FIGURES = ["attack_curves", "defense_curves", "asymmetry", "realignment_matrix", "trajectories", "per_category",
           "pareto"]
ANSWER = {"kind": "attack", "model": "m", "method": "lora", "budget_kind": "flops", "tau": 0.5,
          "best": {"params": {"per_category": 2, "train.lr": 0.003}, "budget": 77.5, "unsafety": 0.61,
                   "utility": 0.8, "feasible": True},
          "pareto": [{"params": {"per_category": 1}, "budget": 40.0, "unsafety": 0.3, "utility": 0.85},
                     {"params": {"per_category": 2, "train.lr": 0.003}, "budget": 77.5, "unsafety": 0.61,
                      "utility": 0.8}],
          "bound": "at most", "bracket": [40.0, 77.5], "trials": 24, "infeasible_trials": 3, "budget_spent": 612.5}


def chromium() -> str | None:
    """A system Chromium (Playwright's own browser download needs a network): MISALIGN_CHROMIUM, else Debian's."""
    for c in (os.environ.get("MISALIGN_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and Path(c).exists():
            return c
    return None


@pytest.fixture(scope="module")
def hand_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made study: 3 seeds whose defenses cost 300, 400, 500 FLOPs against an attack of 100 (factor 4),
    two defense methods, two rounds; and one search answer."""
    root = tmp_path_factory.mktemp("hand")
    study, search = root / "study", root / "search"
    study.mkdir()
    search.mkdir()
    flops = {0: 300.0, 1: 400.0, 2: 500.0}
    table = study_table(seeds=(0, 1, 2), defense_methods=("lora", "dpo"), rounds=2,
                        defense_flops=lambda seed, pc: flops[seed] * pc / 3)
    table.to_parquet(study / "results.parquet")
    (study / "study.yaml").write_text(yaml.safe_dump({"name": "hand-study", "models": ["m"], "seeds": [0, 1, 2]}))
    (search / "answer.json").write_text(json.dumps(ANSWER))
    return write_report(study, root / "report", search_dirs=[search])


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(FIXTURE, tmp_path_factory.mktemp("tiny") / "report")


def open_in_chromium(page_path: Path) -> dict:
    """Load the page from file:// in headless Chromium; return what it saw."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = chromium()
    if exe is None:
        pytest.skip("no system Chromium (apt-get install chromium, or set MISALIGN_CHROMIUM)")
    seen: dict = {"requests": [], "console": [], "errors": []}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe)
        try:
            page = browser.new_page()
            page.on("request", lambda r: seen["requests"].append(r.url))
            page.on("console", lambda m: seen["console"].append((m.type, m.text)))
            page.on("pageerror", lambda e: seen["errors"].append(str(e)))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            seen["url"] = page.url
            seen["images"] = page.eval_on_selector_all(
                "img", "els => els.map(e => ({complete: e.complete, w: e.naturalWidth, h: e.naturalHeight, "
                "alt: e.alt, fig: e.closest('figure') && e.closest('figure').id, scheme: e.src.split(':')[0]}))")
            seen["text"] = page.inner_text("body")
        finally:
            browser.close()
    return seen


def check_page(seen: dict, summary: dict) -> None:
    """Every figure there once and loaded at its size, only data: URIs fetched, a quiet console."""
    images = seen["images"]
    assert [i["fig"] for i in images] == [f"fig-{n}" for n in FIGURES]
    for img in images:
        f = summary["figures"][img["fig"].removeprefix("fig-")]
        assert img["complete"] and img["w"] > 0, img
        assert (img["w"], img["h"]) == (f["width_px"], f["height_px"]) and img["scheme"] == "data"
    assert all(u.startswith("data:") or u == seen["url"] for u in seen["requests"]), seen["requests"]
    assert not [c for c in seen["console"] if c[0] in ("error", "warning")], seen["console"]
    assert not seen["errors"]


def summary_of(report: Path) -> dict:
    return json.loads((report.parent / "summary.json").read_text())


def check_hand_answers(text: str, summary: dict) -> None:
    """The three answers of the hand-made study, as the page and the Markdown give them: A and D are crossings
    between grid points (1/cat and 3/cat on both sides), the factor their ratio with its interval."""
    factor = summary["headline"]["asymmetry"][0]
    a, d = factor["attack_budget"], factor["defense_budget"]
    assert 50 < a < 100 and 400 / 3 < d < 400  # between the grid points that bracket each threshold
    assert (f"m / lora: A = {a:.3g} training FLOPs [" in text
            and "unsafety crosses 0.5 between 1/cat (0.2) and 3/cat (0.6), utility drop 0.1" in text)
    assert (f"m / lora \u2192 dpo on 3/cat: D = {d:.3g} training FLOPs: back between 1/cat and 3/cat, unsafety "
            "0.02, neither 0, utility cost 0.08") in text
    shown = re.search(r"m / lora \u2192 lora: factor (\d\.\d+) \[(\d\.?\d*), (\d\.?\d*)\]", text)
    assert shown and float(shown[1]) == pytest.approx(d / a, rel=0.01)
    assert float(shown[2]) < float(shown[1]) < float(shown[3])
    assert "How to read the asymmetry factor" in text and "never counts as D" in text
    # the search answer carries its bound: a cheaper point was tried and failed
    assert "\u2264 77.5 (> 40: a cheaper point tried was infeasible)" in text


def test_hand_report_in_chromium(hand_report: Path):
    seen = open_in_chromium(hand_report)
    check_page(seen, summary_of(hand_report))
    text = seen["text"]
    check_hand_answers(text, summary_of(hand_report))
    # the ledger, the search answer, the config
    assert "stages trained" in text and "device-seconds saved by sharing" in text
    assert "attack search on m (lora)" in text and "77.5" in text and "612.5" in text  # best and spent budgets
    assert "hand-study" in text


def check_tiny_answers(text: str) -> None:
    """study-tiny (the default study, 2 seeds): LoRA at 1/cat, the smallest point, is already past 0.5, so A is a
    bound and so is every factor; a DPO defense never gets back."""
    assert ("world:base / lora: A \u2264 5.97e+09 training FLOPs: the smallest point tried (1/cat) already reaches "
            "unsafety 0.904") in text
    assert "world:base / lora \u2192 dpo: no defense point got back within 0.05 of base" in text
    # where the grid ended, and what its trend implies (an extrapolation past the largest DPO budget)
    trend = re.search(r"lora \u2192 dpo: no defense.*?would reach it near ([\d.e+]+) training FLOPs, ([\d.]+)x the "
                      r"largest budget tried: an extrapolation, not a measurement", text)
    assert trend and float(trend[2]) > 1
    assert re.search(r"world:base / lora \u2192 lora: factor \u2265 \d", text)
    # 2 seeds: each factor says what its interval covers
    assert text.count("the interval covers 2 seeds only") == 4


def test_real_study_report_in_chromium(tiny_report: Path):
    seen = open_in_chromium(tiny_report)
    check_page(seen, summary_of(tiny_report))
    check_tiny_answers(seen["text"])
    assert "stages reused from another cell" in seen["text"]


def test_no_zero_width_interval_anywhere(tiny_report: Path, hand_report: Path):
    for report in (tiny_report, hand_report):
        md = (report.parent / "report.md").read_text()
        assert not [m for m in re.findall(r"\[([\d.e+-]+), ([\d.e+-]+)\]", md) if m[0] == m[1]]


def test_page_is_self_contained(hand_report: Path):
    page = hand_report.read_text()
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)


def test_markdown_twin_links_its_figures(hand_report: Path):
    md = (hand_report.parent / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(FIGURES)
    for link in links:
        assert not Path(link).is_absolute() and (hand_report.parent / link).stat().st_size > 1000
    check_hand_answers(md, summary_of(hand_report))
    assert "## Budget search answers" in md and "```yaml" in md
    assert not list(hand_report.parent.glob(".*"))  # no temporary files left behind (atomic writes)


def test_markdown_of_the_real_study_gives_bounds(tiny_report: Path):
    check_tiny_answers((tiny_report.parent / "report.md").read_text())


def test_search_dir_without_an_answer_stops(tmp_path: Path):
    with pytest.raises(InputError, match="no answer.json"):
        write_report(FIXTURE, tmp_path / "r", search_dirs=[tmp_path])
    assert not (tmp_path / "r").exists()  # nothing written


def test_not_a_study_dir(tmp_path: Path):
    with pytest.raises(InputError, match="not a study directory"):
        write_report(tmp_path, tmp_path / "r")


def test_how_to_read_says_what_each_repair_assumes():
    """A study with post-hoc repairs among its defenses reads their factors with what each assumes (SafeLoRA and
    RESTA: the model before alignment); one with fine-tuning defenses only gets no such paragraph."""
    params = {"neither_margin": 0.1, "eps": 0.1}
    plain = how_to_read(params, ["lora", "dpo"])
    assert "Defense families" not in plain and "SafeLoRA" not in plain
    text = how_to_read(params, ["lora", "antidote", "safelora", "safelora"])
    assert text.startswith(plain) and "Post-hoc repairs train nothing" in text
    assert text.index(FAMILY_NOTES["safelora"]) < text.index(FAMILY_NOTES["antidote"])
    assert "model before alignment" in text and FAMILY_NOTES["resta"] not in text


def test_a_study_with_a_swept_repair_shows_its_knob(tmp_path: Path):
    from analysis_tables import table_with_resta

    study = tmp_path / "study"
    study.mkdir()
    table_with_resta().to_parquet(study / "results.parquet")
    (study / "study.yaml").write_text(yaml.safe_dump({"name": "resta-study", "models": ["m"], "seeds": [0]}))
    page = write_report(study, tmp_path / "report")
    html, md = page.read_text(), (page.parent / "report.md").read_text()
    assert 'id="fig-repair_knobs"' in html and "the weakest knob setting that gets back" in html
    assert FAMILY_NOTES["resta"] in html and "repair.scale" in md and "### Post-hoc repairs" in md
    # the hand study without repairs shows neither (its pages are checked figure by figure above)
