"""misalign.judges: the judge registry (the names configs accept), building judges and votes from a config's
names and options, and the vote rules. Each judge has its own file: tests/test_judge_keyword.py,
test_judge_classifier.py, test_judge_http.py, test_judge_verdicts.py."""

from __future__ import annotations

import pytest

from misalign.errors import InputError
from misalign.judge_names import JUDGE_NAMES
from misalign.judges import (
    JUDGES,
    JudgeItem,
    KeywordJudge,
    Verdict,
    VoteJudge,
    build_judge,
    build_vote,
)

# ---------------------------------------------------------------- votes and registry


def vote_panel() -> list[KeywordJudge]:
    # Each judge treats a different word as a refusal, so votes differ per response.
    return [KeywordJudge(["alpha"]), KeywordJudge(["beta"]), KeywordJudge(["gamma"])]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("any", [True, True, True, False]),
        ("majority", [True, True, False, False]),
        ("atleast:2", [True, True, False, False]),
        ("all", [True, False, False, False]),
    ],
)
def test_vote_rules(rule, expected):
    # Unsafe votes per response: 3, 2, 1, 0.
    items = [JudgeItem("q", r) for r in ["none", "alpha", "alpha beta", "alpha beta gamma"]]
    verdicts = VoteJudge(vote_panel(), rule).judge(items)
    assert [v.unsafe for v in verdicts] == expected
    assert verdicts[0].raw.count("keyword=unsafe") == 3


def test_vote_categories_union():
    class Fixed:
        def __init__(self, name: str, verdict: Verdict) -> None:
            self.name, self.verdict = name, verdict

        def judge(self, items):
            return [self.verdict for _ in items]

    judges = [
        Fixed("a", Verdict(True, ("S1", "S2"))),
        Fixed("b", Verdict(True, ("S2", "S3"))),
        Fixed("c", Verdict(False, ("S9",))),
    ]
    v = VoteJudge(judges, "all").judge([JudgeItem("q", "r")])[0]
    assert not v.unsafe and v.categories == ("S1", "S2", "S3")
    assert v.raw == "a=unsafe[S1,S2]; b=unsafe[S2,S3]; c=safe[S9]"


@pytest.mark.parametrize("rule", ["most", "atleast:0", "atleast:4", "atleast:x", "ALL", ""])
def test_invalid_vote_rule(rule):
    with pytest.raises(InputError, match="atleast:K"):
        VoteJudge(vote_panel(), rule)


def test_registry_and_build_vote():
    assert set(JUDGES) == {"keyword", "classifier", "http"}
    assert tuple(JUDGES) == JUDGE_NAMES  # what configs accept (misalign.judge_names), in the registry's order
    with pytest.raises(InputError, match="classifier, http, keyword"):
        build_judge("llamaguard")
    with pytest.raises(InputError, match="phrasez"):
        build_judge("keyword", phrasez=["x"])
    single = build_vote([("keyword", {})], "any")
    assert isinstance(single, KeywordJudge)
    vote = build_vote([("keyword", {}), ("keyword", {"phrases": ["nope"]})], "majority")
    assert isinstance(vote, VoteJudge) and vote.threshold == 2
    with pytest.raises(InputError, match="bogus"):
        build_vote([("keyword", {}), ("keyword", {})], "bogus")
