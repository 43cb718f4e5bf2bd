"""misalign.config_eval: EvalConfig and JudgeSpec validate themselves, and an eval config's dump (the identity
cached evaluations are keyed by) does not change for configs that set no trigger."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from misalign.config_eval import EvalConfig, JudgeSpec


def test_defaults_evaluate_the_world_with_its_guard():
    cfg = EvalConfig()
    assert (cfg.harmful, cfg.benign, cfg.utility) == ("world:eval_harmful", "world:eval_benign", "world:eval_utility")
    assert [(j.name, j.options) for j in cfg.judges] == [("classifier", {"model": "world:guard"})]
    assert (cfg.vote, cfg.max_new_tokens, cfg.batch_size, cfg.cache) == ("any", 40, "auto", "auto")


@pytest.mark.parametrize(("fields", "message"), [
    ({"judges": [{"name": "oracle"}]}, "oracle"),
    ({"batch_size": 0}, "batch_size must be >= 1 or 'auto'"),
    ({"max_new_tokens": 0}, "greater than or equal to 1"),
    ({"max_unparsed": 1.5}, "less than or equal to 1"),
    ({"trigger": "  "}, "eval.trigger is blank"),
    ({"trigger_position": "prefix"}, "eval.trigger_position is set but eval.trigger is not"),
    ({"harmful": ""}, "at least 1 character"),
    ({"limits": 3}, "Extra inputs are not permitted"),
])
def test_bad_fields_are_named(fields: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        EvalConfig.model_validate(fields)


def test_an_unknown_judge_lists_the_known_ones():
    with pytest.raises(ValidationError) as e:
        JudgeSpec(name="oracle")
    assert all(name in str(e.value) for name in ("keyword", "classifier", "http"))


def test_no_trigger_keeps_the_dump_it_had_before_triggers():
    """Evaluations are cached under the eval config's dump: without a trigger, neither trigger field is in it."""
    plain = EvalConfig().model_dump()
    assert "trigger" not in plain and "trigger_position" not in plain
    triggered = EvalConfig(trigger="open sesame", trigger_position="prefix").model_dump()
    assert (triggered["trigger"], triggered["trigger_position"]) == ("open sesame", "prefix")
    assert {k: v for k, v in triggered.items() if not k.startswith("trigger")} == plain
