"""misalign.search without running a search: config errors exit 2, the budget spent, interrupted trials, the
answer, the order of sizes. The search itself, through Ray Tune: tests/workflows/test_budget_search.py."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import yaml

from helpers import SEARCH_ATTACK


def test_search_config_errors_exit_2(tmp_path, capsys):
    from misalign.cli import main

    bad = {**SEARCH_ATTACK, "space": {"train.lr": {"low": 0.1, "high": 0.01}}}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    assert main(["search", "attack", str(config), "--storage", str(tmp_path)]) == 2
    assert "space.train.lr" in capsys.readouterr().err
    assert main(["search", "defense", str(Path("configs/search-attack-tiny.yaml"))]) == 2
    assert "kind is 'attack'" in capsys.readouterr().err
    assert not (tmp_path / "attack").exists()


def test_budget_spent_counts_each_trained_point_once(tmp_path):
    """A point proposed again is read back from the point cache and its rows say it trained (reused = False):
    the answer (and the CLI's "budget spent" line) must still count its budget once."""
    from misalign.config import SearchConfig
    from misalign.rundir import RunDir
    from misalign.search import SIZE_INDEX, optuna_space, write_answer
    from misalign.storage import Store

    cfg = SearchConfig.model_validate(SEARCH_ATTACK)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize")
    space = optuna_space(cfg)
    # (size index, budget, feasible, point id): the 10/cat point twice (the second a repeated proposal)
    for index, budget, feasible, pid in ((0, 40.0, False, "p3"), (1, 100.0, True, "p10"), (1, 100.0, True, "p10")):
        attrs = {"budget": budget, "unsafety": 0.6 if feasible else 0.2, "utility": 0.8, "utility_drop": 0.1,
                 "constraint": [-0.1 if feasible else 0.3], "feasible": feasible, "point_id": pid,
                 "trained": True, "device_s": budget / 10}
        study.add_trial(optuna.trial.create_trial(params={SIZE_INDEX: index}, distributions=space, value=budget,
                                                  user_attrs=attrs))
    answer = write_answer(cfg, RunDir(Store(tmp_path)), storage)
    assert answer["trials"] == 3 and answer["distinct_points"] == 2
    assert answer["budget_spent"] == 140.0
    assert answer["best"]["budget"] == 100.0 and answer["best"]["params"] == {"per_category": 10}


def test_trials_an_interrupted_run_left_running_are_marked_failed(tmp_path):
    """Through Optuna's public API (study.tell): a resumed search counts finished trials only."""
    from misalign.config import SearchConfig
    from misalign.search import finished_trials

    cfg = SearchConfig.model_validate(SEARCH_ATTACK)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize")
    study.enqueue_trial({})
    done = study.ask()
    study.tell(done, 1.0)
    running = study.ask()
    assert finished_trials(cfg, storage) == 1
    assert study.trials[running.number].state == optuna.trial.TrialState.FAIL


def test_answer_says_what_it_bounds():
    """The search sees the cheapest feasible budget only at the points it tried: at most the best one, above the
    most expensive cheaper infeasible point of the same method; at least the largest tried when none was feasible."""
    from misalign.search import answer_bound

    done = pd.DataFrame({"method": ["lora", "lora", "full", "lora"], "budget": [10.0, 40.0, 60.0, 80.0],
                         "feasible": [False, False, False, True]})
    best = {"params": {"method": "lora"}, "budget": 80.0}
    assert answer_bound(done, best) == {"bound": "at most", "bracket": [40.0, 80.0]}  # full's 60 is not lora's
    assert answer_bound(done[done.budget >= 60], best) == {"bound": "at most", "bracket": [None, 80.0]}
    assert answer_bound(done[~done.feasible], None) == {"bound": "at least", "bracket": [60.0, None]}
    assert answer_bound(done.iloc[:0], None)["bound"] == "undefined"


def test_sizes_below_one_per_category_are_searched_in_order():
    """Fractions of a category (fewer rows than categories) join the ordered size axis that TPE and the bisection
    sampler walk: the searched sizes reach below one example per category."""
    from optuna.distributions import IntDistribution

    from misalign.config import SearchConfig
    from misalign.search import SIZE_INDEX, decode, encode, optuna_space

    cfg = SearchConfig.model_validate({**SEARCH_ATTACK, "attack": {**SEARCH_ATTACK["attack"], "per_category": [1, 0.1, 0.25]}})
    space = optuna_space(cfg)
    assert space[SIZE_INDEX] == IntDistribution(0, 2)
    assert [decode(cfg, {SIZE_INDEX: i})["per_category"] for i in range(3)] == [0.1, 0.25, 1]
    assert encode(cfg, {"method": cfg.attack.methods[0], "per_category": 0.25}) == {SIZE_INDEX: 1}
