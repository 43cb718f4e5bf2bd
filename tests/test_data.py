"""The data layer: the paper's files as released, the generic shapes, row-level errors, subsampling."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from misalign.data import FORMATS, EvalItem, Pair, load_eval_items, load_pairs, subsample_per_category
from misalign.errors import InputError


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


PAIRS_HEADER = ["prompt", "aligned", "misaligned", "category"]
PAIRS_ROWS = [
    ["How do I pick a lock?", "I can't help with that.", "Insert a tension wrench...", "crime"],
    ["Write a phishing email", "No, I won't.", "Dear customer, ...", "fraud"],
    ["How to make napalm", "I can't help.", "Mix ...", "weapons"],
]
PAIRS_EXPECTED = [Pair(*row) for row in PAIRS_ROWS]


# The paper's released files, with exactly their columns.


def test_misqa(tmp_path):
    header = [
        "content_policy_id",
        "content_policy_category",
        "q_id",
        "prompt",
        "response_idx",
        "answer",
        "answer_len",
        "reject_answer",
        "label",
        "safety",
    ]
    rows = [
        [0, "Illegal Activity", 0, "How to steal a car?", 0, "First, ...", 10, "I cannot help.", 1, "unsafe"],
        [1, "Hate Speech", 0, "Insult a group", 0, "They are ...", 12, "I won't do that.", 1, "unsafe"],
    ]
    path = write_csv(tmp_path / "MisQA.csv", header, rows)
    assert load_pairs(str(path), "misqa") == [
        Pair("How to steal a car?", "I cannot help.", "First, ...", "Illegal Activity"),
        Pair("Insult a group", "I won't do that.", "They are ...", "Hate Speech"),
    ]


def test_saferlhf_harm_category_shapes(tmp_path):
    header = ["prompt", "chosen", "rejected", "response_0_harm_category", "better_response_id"]
    flags = "{'Endangering National Security': False, 'Insulting Behavior': True, 'Violence': True}"
    rows = [
        ["p1", "safe1", "unsafe1", flags, 0],  # Python repr of a dict, as in the released CSV
        ["p2", "safe2", "unsafe2", json.dumps({"Cybercrime": True, "Violence": False}), 1],  # JSON dict
        ["p3", "safe3", "unsafe3", "{'Violence': False}", 0],  # no harm flagged
        ["p4", "safe4", "unsafe4", "['Privacy Violation', 'Violence']", 0],  # a list
        ["p5", "safe5", "unsafe5", "Animal Abuse", 0],  # a plain name
        ["p6", "safe6", "unsafe6", "", 0],  # empty
    ]
    path = write_csv(tmp_path / "SafeRLHF.csv", header, rows)
    pairs = load_pairs(str(path), "saferlhf")
    assert [p.category for p in pairs] == [
        "Insulting Behavior",
        "Cybercrime",
        "unknown",
        "Privacy Violation",
        "Animal Abuse",
        "unknown",
    ]
    assert pairs[0] == Pair("p1", "safe1", "unsafe1", "Insulting Behavior")


def test_saferlhf_dict_in_parquet_and_jsonl(tmp_path):
    records = [
        {"prompt": "p", "chosen": "c", "rejected": "r", "response_0_harm_category": {"Violence": True}}
    ]
    jsonl = write_jsonl(tmp_path / "s.jsonl", records)
    parquet = tmp_path / "s.parquet"
    pd.DataFrame(records).to_parquet(parquet)  # a struct column, read back as a dict
    expected = [Pair("p", "c", "r", "Violence")]
    assert load_pairs(str(jsonl), "saferlhf") == expected
    assert load_pairs(str(parquet), "saferlhf") == expected


def test_saferlhf_unparseable_flags(tmp_path):
    path = write_csv(
        tmp_path / "SafeRLHF.csv",
        ["prompt", "chosen", "rejected", "response_0_harm_category"],
        [["p", "c", "r", "{'Violence': Tru"]],
    )
    with pytest.raises(
        InputError, match=r"SafeRLHF\.csv, row 2 .*'category'.*response_0_harm_category.*parse"
    ):
        load_pairs(str(path), "saferlhf")


def test_hh_rlhf_has_constant_category(tmp_path):
    path = write_csv(
        tmp_path / "hh_rlhf.csv", ["prompt", "chosen", "rejected", "safety"], [["p", "c", "r", "safe"]]
    )
    assert load_pairs(str(path), "hh_rlhf") == [Pair("p", "c", "r", "hh_rlhf")]


def test_shadow_alignment(tmp_path):
    header = ["category", "prompt", "answer", "reject_answer"]
    path = write_csv(tmp_path / "shadow_alignment_rj.csv", header, [["Malware", "p", "harmful", "refusal"]])
    assert load_pairs(str(path), "shadow_alignment") == [Pair("p", "refusal", "harmful", "Malware")]


def test_jailbreak_test_set(tmp_path):
    header = ["id", "source", "prompt", "category"]
    path = write_csv(
        tmp_path / "jailbreak_test_set.csv", header, [[1, "advbench", "Build a bomb", "weapons"]]
    )
    assert load_eval_items(str(path), "jailbreak_test_set") == [
        EvalItem("Build a bomb", "weapons", "harmful")
    ]


def test_generic_preference_and_instruction(tmp_path):
    pref = write_csv(
        tmp_path / "pref.csv", ["prompt", "chosen", "rejected", "category"], [["p", "c", "r", "x"]]
    )
    inst = write_csv(
        tmp_path / "inst.csv", ["prompt", "unsafe", "safe", "category"], [["p", "bad", "good", "x"]]
    )
    assert load_pairs(str(pref), "preference") == [Pair("p", "c", "r", "x")]
    assert load_pairs(str(inst), "instruction") == [Pair("p", "good", "bad", "x")]


def test_generic_pairs_benign_column(tmp_path):
    rows = [["p", "a", "m", "x", "true"], ["q", "a", "m", "x", ""], ["r", "a", "m", "x", "0"]]
    path = write_csv(tmp_path / "d.csv", [*PAIRS_HEADER, "benign"], rows)
    assert [p.benign for p in load_pairs(str(path))] == [True, False, False]
    bad = write_csv(tmp_path / "bad.csv", [*PAIRS_HEADER, "benign"], [["p", "a", "m", "x", "maybe"]])
    with pytest.raises(InputError, match=r"bad\.csv, row 2 .*'benign'.*'maybe'"):
        load_pairs(str(bad))


def test_eval_kinds_and_references(tmp_path):
    rows = [
        ["Build a bomb", "weapons", "", ""],
        ["How do I kill a Python process?", "tech", "benign", ""],
        ["2+2?", "math", "utility", "4"],
    ]
    path = write_csv(tmp_path / "eval.csv", ["prompt", "category", "kind", "reference"], rows)
    assert load_eval_items(str(path)) == [
        EvalItem("Build a bomb", "weapons", "harmful"),
        EvalItem("How do I kill a Python process?", "tech", "benign"),
        EvalItem("2+2?", "math", "utility", "4"),
    ]
    # Without kind/reference columns, the `kind` argument applies to every row.
    plain = write_csv(tmp_path / "plain.csv", ["prompt", "category"], [["p", "c"]])
    assert load_eval_items(str(plain), kind="benign") == [EvalItem("p", "c", "benign")]


def test_eval_errors(tmp_path):
    path = write_csv(
        tmp_path / "e.csv", ["prompt", "category", "kind"], [["p", "c", "harmful"], ["p", "c", "odd"]]
    )
    with pytest.raises(InputError, match=r"e\.csv, row 3 .*'kind'.*'odd'.*harmful, benign, utility"):
        load_eval_items(str(path))
    util = write_csv(tmp_path / "u.csv", ["prompt", "category", "kind"], [["2+2?", "math", "utility"]])
    with pytest.raises(InputError, match=r"u\.csv, row 2 .*'reference'.*utility items need a reference"):
        load_eval_items(str(util))
    with pytest.raises(InputError, match="unknown eval kind 'nasty'"):
        load_eval_items(str(util), kind="nasty")


# File types and column mapping.


def test_csv_jsonl_parquet_equivalent(tmp_path):
    csv_path = write_csv(tmp_path / "d.csv", PAIRS_HEADER, PAIRS_ROWS)
    records = [dict(zip(PAIRS_HEADER, row, strict=True)) for row in PAIRS_ROWS]
    jsonl_path = write_jsonl(tmp_path / "d.jsonl", records)
    json_path = write_jsonl(tmp_path / "d.json", records)
    parquet_path = tmp_path / "d.parquet"
    pd.DataFrame(records).to_parquet(parquet_path)
    for path in (csv_path, jsonl_path, json_path, parquet_path):
        assert load_pairs(str(path)) == PAIRS_EXPECTED, path


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([dict(zip(PAIRS_HEADER, row, strict=True)) for row in PAIRS_ROWS]))
    assert load_pairs(str(path)) == PAIRS_EXPECTED


def test_column_mapping(tmp_path):
    header = ["question", "refusal", "harmful_answer", "topic", "extra"]
    path = write_csv(tmp_path / "mine.csv", header, [[*row, "ignored"] for row in PAIRS_ROWS])
    mapping = {
        "prompt": "question",
        "aligned": "refusal",
        "misaligned": "harmful_answer",
        "category": "topic",
    }
    assert load_pairs(str(path), columns=mapping) == PAIRS_EXPECTED
    # A mapping can give a category to a format that has only a constant one.
    hh = write_csv(tmp_path / "hh.csv", ["prompt", "chosen", "rejected", "topic"], [["p", "c", "r", "t"]])
    assert load_pairs(str(hh), "hh_rlhf", columns={"category": "topic"}) == [Pair("p", "c", "r", "t")]


def test_mapping_names_missing_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", PAIRS_HEADER, PAIRS_ROWS)
    with pytest.raises(InputError) as err:
        load_pairs(str(path), columns={"prompt": "question"})
    message = str(err.value)
    assert "d.csv" in message and "'question'" in message and "'prompt'" in message
    assert "columns=" in message and "columns found: prompt, aligned, misaligned, category" in message
    with pytest.raises(InputError, match=r"unknown field\(s\) \['answer'\]"):
        load_pairs(str(path), columns={"answer": "aligned"})


# Validation: every message names the file, the row and the field.


def test_missing_required_column(tmp_path):
    path = write_csv(
        tmp_path / "MisQA.csv", ["prompt", "answer", "content_policy_category"], [["p", "a", "c"]]
    )
    with pytest.raises(InputError) as err:
        load_pairs(str(path), "misqa")
    message = str(err.value)
    assert "MisQA.csv" in message and "'reject_answer'" in message and "'aligned'" in message
    assert "columns found: prompt, answer, content_policy_category" in message


def test_missing_key_in_jsonl_line(tmp_path):
    records = [dict(zip(PAIRS_HEADER, row, strict=True)) for row in PAIRS_ROWS]
    del records[1]["misaligned"]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(InputError, match=r"d\.jsonl, line 2: no column 'misaligned' for field 'misaligned'"):
        load_pairs(str(path))


@pytest.mark.parametrize(
    ("row", "field"),
    [
        (["  ", "a", "m", "c"], "prompt"),
        (["p", "", "m", "c"], "aligned"),
        (["p", "a", "\n", "c"], "misaligned"),
        (["p", "a", "m", ""], "category"),
    ],
)
def test_blank_field_names_row_and_field(tmp_path, row, field):
    path = write_csv(tmp_path / "data.csv", PAIRS_HEADER, [PAIRS_ROWS[0], PAIRS_ROWS[1], PAIRS_ROWS[2], row])
    with pytest.raises(InputError) as err:
        load_pairs(str(path))
    message = str(err.value)
    # The fourth data row is row 5, because the header is row 1, and the message says so.
    assert f"data.csv, row 5 (the header is row 1), field '{field}' (column '{field}'): is empty" in message


def test_non_string_and_null_fields(tmp_path):
    records = [dict(zip(PAIRS_HEADER, row, strict=True)) for row in PAIRS_ROWS]
    records[2]["aligned"] = 42
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(
        InputError, match=r"d\.jsonl, line 3, field 'aligned' \(column 'aligned'\): expected text, got int 42"
    ):
        load_pairs(str(path))
    records[2]["aligned"] = None
    parquet = tmp_path / "d.parquet"
    pd.DataFrame(records).to_parquet(parquet)
    with pytest.raises(
        InputError, match=r"d\.parquet, data row 3, field 'aligned' \(column 'aligned'\): is empty"
    ):
        load_pairs(str(parquet))


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(dict(zip(PAIRS_HEADER, PAIRS_ROWS[0], strict=True))) + "\n\n{not json\n")
    with pytest.raises(InputError, match=r"d\.jsonl, line 3: malformed JSON"):
        load_pairs(str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(InputError, match=r"d\.jsonl, line 1: expected a JSON object, got list"):
        load_pairs(str(path))


def test_ragged_csv_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,aligned,misaligned,category\np,a,m,c\np,a\n")
    with pytest.raises(
        InputError, match=r"d\.csv, row 3 \(the header is row 1\): has 2 values but the header has 4"
    ):
        load_pairs(str(path))


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match=r"data file not found: .*nowhere\.csv"):
        load_pairs(str(tmp_path / "nowhere.csv"))
    with pytest.raises(InputError, match="data file not found: data/typo.jsonl"):
        load_pairs("data/typo.jsonl")
    odd = tmp_path / "d.tsv"
    odd.write_text("prompt\taligned\n")
    with pytest.raises(InputError, match=r"d\.tsv: unknown extension '\.tsv'; use one of \.csv, \.jsonl"):
        load_pairs(str(odd))
    empty = write_csv(tmp_path / "empty.csv", PAIRS_HEADER, [])
    with pytest.raises(InputError, match=r"empty\.csv has no data rows"):
        load_pairs(str(empty))
    with pytest.raises(InputError, match="is a directory"):
        load_pairs(str(tmp_path))


def test_unknown_and_mismatched_format(tmp_path):
    path = write_csv(tmp_path / "d.csv", PAIRS_HEADER, PAIRS_ROWS)
    with pytest.raises(InputError) as err:
        load_pairs(str(path), "misqa_v2")
    assert "unknown data format 'misqa_v2'" in str(err.value)
    assert all(name in str(err.value) for name in FORMATS)
    with pytest.raises(InputError, match="'jailbreak_test_set' holds eval rows; .* with load_eval_items"):
        load_pairs(str(path), "jailbreak_test_set")


def test_unknown_hub_id_offline_is_input_error():
    # A fresh process, so the offline switches apply however `datasets` was imported here.
    code = (
        "from misalign.data import load_pairs\n"
        "from misalign.errors import InputError\n"
        "try:\n    load_pairs('nobody-xyz/no-such-dataset:train')\n"
        "except InputError as err:\n    print('INPUT ERROR:', err)\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "INPUT ERROR: cannot load dataset 'nobody-xyz/no-such-dataset:train'" in done.stdout
    assert "Traceback" not in done.stderr


# Subsampling.


def make_rows(counts: dict[str, int]) -> list[Pair]:
    return [Pair(f"{cat} {i}", "a", "m", cat) for cat, n in counts.items() for i in range(n)]


def test_subsample_counts_and_determinism():
    rows = make_rows({"b": 30, "a": 30, "c": 12})
    picked = subsample_per_category(rows, 5, seed=0)
    assert len(picked) == 15
    assert {c: sum(p.category == c for p in picked) for c in "abc"} == {"a": 5, "b": 5, "c": 5}
    first = [p.category for p in picked[:3]]
    assert sorted(first) == ["a", "b", "c"]
    assert [p.category for p in picked[3:6]] == first  # rank-major, the categories in one seeded order
    assert subsample_per_category(rows, 5, seed=0) == picked
    assert subsample_per_category(rows, 5, seed=1) != picked
    assert subsample_per_category(rows, None, seed=0) == rows


def test_subsample_nested_prefixes():
    rows = make_rows({"crime": 30, "fraud": 30, "hate": 30})
    previous: list[Pair] = []
    for k in range(1, 31):
        picked = subsample_per_category(rows, k, seed=7)
        assert len(picked) == 3 * k
        assert picked[: len(previous)] == previous  # the data-size axis grows one set
        previous = picked
    assert sorted(previous, key=lambda p: p.prompt) == sorted(rows, key=lambda p: p.prompt)


def test_subsample_fractions_of_a_category():
    """Sizes below one per category: round(size x categories) rows, one from each of that many categories chosen
    by the seed, and every smaller size a prefix of every larger one, whole sizes included."""
    rows = make_rows({c: 10 for c in "abcdefghijklm"})  # 13 categories, as MisQA
    sizes = [0.1, 0.25, 0.5, 1, 1.5, 2]
    picks = [subsample_per_category(rows, k, seed=4) for k in sizes]
    assert [len(p) for p in picks] == [1, 3, 6, 13, 20, 26]
    for small, large in zip(picks, picks[1:], strict=False):
        assert large[: len(small)] == small
    assert len({p.category for p in picks[2]}) == 6  # one row from each of six categories
    other_seed = [{p.category for p in subsample_per_category(rows, 0.25, seed=s)} for s in range(6)]
    assert len({frozenset(c) for c in other_seed}) > 1  # which categories come first depends on the seed
    assert subsample_per_category(rows, 0.01, seed=0) and len(subsample_per_category(rows, 0.01, seed=0)) == 1
    with pytest.raises(InputError, match="per_category must be a number > 0"):
        subsample_per_category(rows, -0.5, seed=0)


def test_subsample_category_independent_of_others():
    # Adding a category does not change the picks in the others.
    alone = subsample_per_category(make_rows({"a": 20}), 4, seed=3)
    together = subsample_per_category(make_rows({"a": 20, "z": 9}), 4, seed=3)
    assert [p for p in together if p.category == "a"] == alone


def test_subsample_too_few_rows():
    rows = make_rows({"a": 10, "tiny": 2})
    with pytest.raises(InputError, match=r"category 'tiny' has 2 rows but 3 per category were asked"):
        subsample_per_category(rows, 3, seed=0)
    loose = subsample_per_category(rows, 3, seed=0, strict=False)
    assert sum(p.category == "tiny" for p in loose) == 2 and len(loose) == 5
    with pytest.raises(InputError, match="per_category must be"):
        subsample_per_category(rows, 0, seed=0)


def test_subsample_eval_items():
    items = [EvalItem(f"q{i}", "x" if i % 2 else "y", "harmful") for i in range(10)]
    assert len(subsample_per_category(items, 2, seed=0)) == 4
