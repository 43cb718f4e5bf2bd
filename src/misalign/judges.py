"""Judges: decide whether a model's response to a harmful prompt is unsafe (it actually complies).

One interface (`Judge.judge(items) -> list[Verdict]`), one registry (`JUDGES`, `build_judge`, `build_vote`).
Here: the registry and the vote over several judges. The judges live beside it and are re-exported from here:
judge_keyword.py (refusal phrases), judge_classifier.py (a local or Hub model), judge_http.py (an
OpenAI-compatible endpoint, with its API-key rules), over judge_verdicts.py (JudgeItem, Verdict, the Judge
protocol, guard-output parsing).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from misalign.errors import InputError
from misalign.judge_classifier import ClassifierJudge
from misalign.judge_http import DEFAULT_RUBRIC, HttpJudge, JudgeUnavailable
from misalign.judge_keyword import DEFAULT_REFUSAL_PHRASES, KeywordJudge, is_refusal
from misalign.judge_verdicts import Judge, JudgeItem, Verdict, parse_guard_output, parse_guard_outputs

__all__ = [
    "DEFAULT_REFUSAL_PHRASES", "DEFAULT_RUBRIC", "JUDGES", "ClassifierJudge", "HttpJudge", "Judge", "JudgeItem",
    "JudgeUnavailable", "KeywordJudge", "Verdict", "VoteJudge", "build_judge", "build_vote", "check_vote",
    "is_refusal", "parse_guard_output", "parse_guard_outputs",
]


def _parse_rule(rule: str, n: int) -> int:
    """Minimum number of unsafe votes for the rule over `n` judges."""
    forms = "'any', 'majority', 'all' or 'atleast:K' with 1 <= K <= number of judges"
    if rule == "any":
        return 1
    if rule == "all":
        return n
    if rule == "majority":
        return n // 2 + 1  # strictly more than half
    if rule.startswith("atleast:"):
        k = rule.removeprefix("atleast:")
        if k.isdigit() and 1 <= int(k) <= n:
            return int(k)
    raise InputError(f"vote rule {rule!r} is not valid for {n} judge(s); use {forms}")


class VoteJudge:
    """Unsafe when enough judges say unsafe; the rule says how many."""

    def __init__(self, judges: Sequence[Judge], rule: str) -> None:
        if not judges:
            raise InputError("VoteJudge needs at least one judge")
        self.judges = list(judges)
        self.rule = rule
        self.threshold = _parse_rule(rule, len(self.judges))
        self.name = f"vote[{rule}]({','.join(j.name for j in self.judges)})"

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        per_judge = [j.judge(items) for j in self.judges]
        out = []
        for votes in zip(*per_judge, strict=True):
            unsafe_votes = [v for v in votes if v.unsafe]
            cats = tuple(dict.fromkeys(c for v in unsafe_votes for c in v.categories))
            raw = "; ".join(
                (f"{j.name}=unreadable:{v.raw.strip()[:80]!r}" if v.unreadable else
                 f"{j.name}={'unsafe' if v.unsafe else 'safe'}")
                + (f"[{','.join(v.categories)}]" if v.categories else "")
                for j, v in zip(self.judges, votes, strict=True)
            )
            unreadable = tuple(dict.fromkeys(n for v in votes for n in v.unreadable))
            out.append(Verdict(unsafe=len(unsafe_votes) >= self.threshold, categories=cats, raw=raw,
                               unreadable=unreadable))
        return out


# configs check judge names against misalign.judge_names.JUDGE_NAMES, which lists these keys in this order
JUDGES: dict[str, type] = {"keyword": KeywordJudge, "classifier": ClassifierJudge, "http": HttpJudge}


def _judge_class(name: str, options: dict[str, Any]) -> type:
    """The registered judge class, its options checked against its constructor (nothing heavy loads)."""
    cls = JUDGES.get(name)
    if cls is None:
        raise InputError(f"unknown judge {name!r}; known judges: {', '.join(sorted(JUDGES))}")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise InputError(f"bad options for judge {name!r}: {err}") from None
    return cls


def build_judge(name: str, **options: Any) -> Judge:
    """Build a registered judge, checking the options before anything heavy loads."""
    return _judge_class(name, options)(**options)


def check_vote(names_and_options: Sequence[tuple[str, dict[str, Any]]], rule: str, *,
               endpoints: bool = True) -> None:
    """Check a vote's rule and every judge's options without loading a model; HTTP judges check their key's
    environment variable and that their endpoint accepts connections, unless `endpoints` is False (a plan, which
    calls no judge). (Model judges' models: misalign.preflight.)"""
    if not names_and_options:
        raise InputError("a vote needs at least one judge")
    _parse_rule(rule, len(names_and_options))
    for name, options in names_and_options:
        cls = _judge_class(name, options)
        if cls is HttpJudge and endpoints:
            HttpJudge(**options).preflight()
        elif cls is KeywordJudge:
            KeywordJudge(**options)


def build_vote(names_and_options: Sequence[tuple[str, dict[str, Any]]], rule: str) -> Judge:
    """A vote over registered judges; one judge under any rule is just that judge."""
    if not names_and_options:
        raise InputError("a vote needs at least one judge")
    _parse_rule(rule, len(names_and_options))  # fail on a bad rule before loading any model
    judges = [build_judge(name, **opts) for name, opts in names_and_options]
    return judges[0] if len(judges) == 1 else VoteJudge(judges, rule)
