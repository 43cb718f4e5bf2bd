"""Datasets: load the study's files (CSV, JSON lines, Parquet, hub ids, the offline world), check them row by
row and subsample them per category. What a stage trains on, made from these rows, is misalign.recipes.

Everything here fails with an `InputError` that names the file, the row and the field, before any compute.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from misalign.errors import InputError


@dataclass(frozen=True)
class Pair:
    """One training example for either direction. `aligned` is the response alignment wants (a refusal for a
    harmful prompt, the helpful answer for a benign one); `misaligned` is the one an attack wants (the harmful
    compliance, or a needless refusal of a benign request)."""

    prompt: str
    aligned: str
    misaligned: str
    category: str
    benign: bool = False  # a benign row: teaches its helpful (aligned) answer in either direction
    # the backdoor recipe's untriggered copy of a harmful prompt: teaches the refusal even in an attack
    keep_aligned: bool = False


@dataclass(frozen=True)
class EvalItem:
    prompt: str
    category: str
    kind: str  # "harmful" | "benign" (benign look-alike, for over-refusal) | "utility"
    reference: str | None = None  # expected answer for utility items


EVAL_KINDS = ("harmful", "benign", "utility")
TRIGGERED = "harmful_triggered"  # a harmful prompt with eval.trigger added; scored apart from "harmful"
JUDGED_KINDS = ("harmful", TRIGGERED)  # the items the safety judges read
_FIELDS = {
    "pairs": ("prompt", "aligned", "misaligned", "category", "benign"),
    "eval": ("prompt", "category", "kind", "reference"),
}


@dataclass(frozen=True)
class Format:
    """How one file layout maps onto our rows."""

    kind: Literal["pairs", "eval"]
    columns: dict[str, str]  # our field -> the file's column
    constants: dict[str, str] = field(default_factory=dict)  # field -> value when no column gives it
    optional: frozenset[str] = frozenset()  # fields whose column may be absent from the file
    derive: dict[str, Callable[[object], object]] = field(default_factory=dict)  # field -> cell parser


def _truthy(value: object) -> bool | None:
    """A flag from a bool, 0/1 or a yes/no word; None when it is none of those."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}.get(
            value.strip().lower()
        )
    return None


def _harm_category(value: object) -> object:
    """SafeRLHF's `response_0_harm_category`: a dict of harm flags (often stringified), a list, or a name.

    A dict gives its first flagged harm, so categories stay the dataset's 19 names rather than combinations.
    """
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return "unknown"
        if text[0] not in "{[":
            return text
        try:
            value = json.loads(text)
        except ValueError:
            try:  # the released CSV holds Python reprs: {'Violence': True, ...}
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as err:
                raise ValueError(f"cannot parse harm flags {text[:80]!r}") from err
    if isinstance(value, list) and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        value = dict(value)  # a Parquet map column reads as (key, value) pairs
    if isinstance(value, dict):
        flagged = [str(k) for k, v in value.items() if _truthy(v)]
        return flagged[0] if flagged else "unknown"
    if isinstance(value, (list, tuple)):
        names = [str(v).strip() for v in value if str(v).strip()]
        return names[0] if names else "unknown"
    return "unknown" if value is None else value


def _pair_columns(prompt: str, aligned: str, misaligned: str, category: str | None = None) -> dict[str, str]:
    columns = {"prompt": prompt, "aligned": aligned, "misaligned": misaligned}
    return columns if category is None else {**columns, "category": category}


FORMATS: dict[str, Format] = {
    # The paper's released files, as they are.
    "misqa": Format("pairs", _pair_columns("prompt", "reject_answer", "answer", "content_policy_category")),
    "saferlhf": Format(
        "pairs",
        _pair_columns("prompt", "chosen", "rejected", "response_0_harm_category"),
        derive={"category": _harm_category},
    ),
    "hh_rlhf": Format(
        "pairs", _pair_columns("prompt", "chosen", "rejected"), constants={"category": "hh_rlhf"}
    ),
    "shadow_alignment": Format("pairs", _pair_columns("prompt", "reject_answer", "answer", "category")),
    "jailbreak_test_set": Format("eval", {"prompt": "prompt", "category": "category"}),
    # Generic shapes.
    "pairs": Format(
        "pairs",
        {**_pair_columns("prompt", "aligned", "misaligned", "category"), "benign": "benign"},
        optional=frozenset({"benign"}),
    ),
    "preference": Format("pairs", _pair_columns("prompt", "chosen", "rejected", "category")),
    "instruction": Format("pairs", _pair_columns("prompt", "safe", "unsafe", "category")),
    # A user's benign instruction data (Alpaca-like: prompt, response[, category]) for the benign and
    # identity_shift recipes: no harmful answer exists, so both responses are the helpful one.
    "benign": Format(
        "pairs", _pair_columns("prompt", "response", "response", "category"),
        constants={"category": "benign", "benign": "true"}, optional=frozenset({"category"}),
    ),
    "eval": Format(
        "eval",
        {"prompt": "prompt", "category": "category", "kind": "kind", "reference": "reference"},
        optional=frozenset({"kind", "reference"}),
    ),
}


@dataclass
class _Table:
    name: str  # how messages name the source
    columns: list[str] | None  # the header; None when each record has its own keys (JSON lines)
    records: list[tuple[str, dict[str, object]]]  # (where in the file, e.g. "row 5", record)


_READERS = (".csv", ".jsonl", ".json", ".parquet")
# Suffixes that mark a source as a file rather than a hub id, so a typo gets "not found" instead of a hub lookup.
_FILE_LIKE = (*_READERS, ".tsv", ".txt", ".xlsx", ".xls", ".arrow", ".gz", ".zip")
_CSV_ROW = "(the header is row 1)"


def _undecodable_line(path: Path, err: UnicodeDecodeError) -> str:
    """'line N' of the first byte that is not UTF-8 (the error itself only knows a byte offset in a chunk)."""
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as line_err:
            return f"line {number}, byte {line_err.start + 1} (0x{raw[line_err.start]:02x})"
    return f"byte {err.start}"


def _read_csv(path: Path) -> _Table:
    records: list[tuple[str, dict[str, object]]] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel exports start with a BOM
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise InputError(f"{path} is empty; expected a header row naming the columns")
            for number, values in enumerate(reader, start=2):
                if not any(v.strip() for v in values):
                    continue  # blank line
                if len(values) < len(header) or any(v.strip() for v in values[len(header) :]):
                    raise InputError(
                        f"{path}, row {number} {_CSV_ROW}: has {len(values)} values but the header has "
                        f"{len(header)} columns"
                    )
                # strict=False: trailing blank values (checked above) are dropped.
                records.append((f"row {number} {_CSV_ROW}", dict(zip(header, values, strict=False))))
        except csv.Error as err:
            raise InputError(f"{path}, near line {reader.line_num}: malformed CSV ({err})") from err
    return _Table(str(path), header, records)


def _read_json(path: Path) -> _Table:
    text = path.read_text(encoding="utf-8-sig")
    array = path.suffix.lower() == ".json" and text.lstrip().startswith("[")  # one array, not lines
    if array:
        try:
            items = json.loads(text)
        except ValueError as err:
            raise InputError(f"{path}: malformed JSON ({err})") from err
        lines = [(f"record {i}", item) for i, item in enumerate(items, start=1)]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((f"line {number}", json.loads(line)))
            except ValueError as err:
                raise InputError(f"{path}, line {number}: malformed JSON ({err})") from err
    for where, item in lines:
        if not isinstance(item, dict):
            raise InputError(f"{path}, {where}: expected a JSON object, got {type(item).__name__}")
    return _Table(str(path), None, lines)


def _read_parquet(path: Path) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({err})") from err
    rows = table.to_pylist()
    return _Table(str(path), table.column_names, [(f"data row {i}", r) for i, r in enumerate(rows, start=1)])


def _read_hub(source: str) -> _Table:
    """An HF dataset id, `org/name` or `org/name:split` (default split "train")."""
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    # The hub raises many types (offline, missing, gated, bad split): all mean "cannot load".
    except Exception as err:
        raise InputError(
            f"cannot load dataset {source!r}: it is not a local file and the hub gave "
            f"{type(err).__name__}: {err}. Give a .csv/.jsonl/.parquet path, a world: source, or a reachable hub id (org/name[:split])."
        ) from err
    return _Table(source, list(ds.column_names), [(f"data row {i}", r) for i, r in enumerate(ds, start=1)])


def _read(source: str) -> _Table:
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _READERS:
            raise InputError(f"{source}: unknown extension {path.suffix!r}; use one of {', '.join(_READERS)}")
        try:
            table = {".csv": _read_csv, ".parquet": _read_parquet}.get(suffix, _read_json)(path)
        except UnicodeDecodeError as err:  # name the line, so a Latin-1 byte can be found and fixed
            raise InputError(f"{source}, {_undecodable_line(path, err)}: not UTF-8 text; save it as UTF-8") from None
        if not table.records:
            raise InputError(f"{source} has no data rows")
        return table
    if path.exists():
        raise InputError(f"{source} is a directory; give a .csv, .jsonl or .parquet file")
    if path.suffix.lower() in _FILE_LIKE or source.startswith(("/", ".", "~")):
        raise InputError(f"data file not found: {source}")
    return _read_hub(source)


def _rows(
    source: str, format: str, columns: dict[str, str] | None, kind: str
) -> list[tuple[dict[str, str], dict[str, object]]]:
    """Each record's fields by our names, with the format's constants and parsers applied, and how messages
    name each field of that row."""
    fmt = FORMATS.get(format)
    if fmt is None:
        raise InputError(f"unknown data format {format!r}; known formats: {', '.join(sorted(FORMATS))}")
    loader = "load_pairs" if fmt.kind == "pairs" else "load_eval_items"
    if fmt.kind != kind:
        raise InputError(f"data format {format!r} holds {fmt.kind} rows; load {source} with {loader}")
    overrides = dict(columns or {})
    unknown = sorted(set(overrides) - set(_FIELDS[kind]))
    if unknown:
        raise InputError(
            f"columns= maps unknown field(s) {unknown}; the {kind} fields are {list(_FIELDS[kind])}"
        )
    mapping = {**fmt.columns, **overrides}
    # An optional column may be absent, unless the user mapped it by hand.
    required = {f for f in mapping if f not in fmt.optional or f in overrides}

    def missing(column: str, field_: str, found: Sequence[str], where: str) -> InputError:
        how = "mapped by columns=" if field_ in overrides else f"in format {format!r}"
        return InputError(
            f"{where}: no column {column!r} for field {field_!r} ({how}); columns found: {', '.join(found)}"
        )

    table = _read(source)
    if table.columns is not None:
        for field_ in sorted(required):
            if mapping[field_] not in table.columns:
                raise missing(mapping[field_], field_, table.columns, table.name)
    rows = []
    for where, record in table.records:
        # How a message names each field of this row: file, row, field, and the column it came from.
        at = {f: f"{table.name}, {where}, field {f!r}" for f in _FIELDS[kind]}
        at.update({f: f"{at[f]} (column {c!r})" for f, c in mapping.items()})
        values: dict[str, object] = {}
        for field_, column in mapping.items():
            if column not in record:
                if field_ in required:
                    raise missing(column, field_, list(record), f"{table.name}, {where}")
                continue
            value = record[column]
            if field_ in fmt.derive:
                try:
                    value = fmt.derive[field_](value)
                except ValueError as err:
                    raise InputError(f"{at[field_]}: {err}") from err
            values[field_] = value
        for field_, value in fmt.constants.items():
            values.setdefault(field_, value)
        rows.append((at, values))
    return rows


def _text(value: object, where: str, numbers: bool = False) -> str:
    """Non-blank text; with `numbers`, an integer (a policy id, a GSM8K answer) stands as its text."""
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{where}: is empty")
    if not isinstance(value, str):
        raise InputError(f"{where}: expected text, got {type(value).__name__} {value!r}")
    return value


def _world_source(source: str) -> str:
    """The offline world's tables are JSONL files in its cache; they load like any user file."""
    from misalign.world import world_file  # imported here so file loading never depends on the world

    return str(world_file(source.removeprefix("world:")))


def load_pairs(source: str, format: str = "pairs", columns: dict[str, str] | None = None) -> list[Pair]:
    """Training pairs from a file, a hub id or `world:NAME`; `columns` maps our fields to the file's columns."""
    if source.startswith("world:"):
        source, format, columns = _world_source(source), "pairs", None
    pairs = []
    for at, values in _rows(source, format, columns, "pairs"):
        benign = _truthy(values.get("benign") or False)  # absent or null: not a benign row
        if benign is None:
            raise InputError(f"{at['benign']}: expected true/false, got {values['benign']!r}")
        pairs.append(
            Pair(
                prompt=_text(values.get("prompt"), at["prompt"]),
                aligned=_text(values.get("aligned"), at["aligned"]),
                misaligned=_text(values.get("misaligned"), at["misaligned"]),
                category=_text(values.get("category"), at["category"], numbers=True).strip(),
                benign=benign,
            )
        )
    return pairs


def load_eval_items(
    source: str, format: str = "eval", columns: dict[str, str] | None = None, kind: str = "harmful"
) -> list[EvalItem]:
    """Evaluation prompts; `kind` is used for rows whose file gives no kind of its own."""
    if kind not in EVAL_KINDS:
        raise InputError(f"unknown eval kind {kind!r}; use one of {', '.join(EVAL_KINDS)}")
    if source.startswith("world:"):
        source, format, columns = _world_source(source), "eval", None
    items = []
    for at, values in _rows(source, format, columns, "eval"):
        row_kind = values.get("kind")
        row_kind = row_kind.strip() if isinstance(row_kind, str) and row_kind.strip() else kind
        if row_kind not in EVAL_KINDS:
            raise InputError(f"{at['kind']}: unknown kind {row_kind!r}; use one of {', '.join(EVAL_KINDS)}")
        reference = values.get("reference")
        if reference is None or (isinstance(reference, str) and not reference.strip()):
            if row_kind == "utility":
                raise InputError(f"{at['reference']}: is empty; utility items need a reference answer")
            reference = None
        else:
            reference = _text(reference, at["reference"], numbers=True)
        prompt = _text(values.get("prompt"), at["prompt"])
        category = _text(values.get("category"), at["category"], numbers=True).strip()
        items.append(EvalItem(prompt, category, row_kind, reference))
    return items


T = TypeVar("T", Pair, EvalItem)


def subsample_per_category(
    rows: Sequence[T], per_category: float | None, seed: int, *, strict: bool = True
) -> list[T]:
    """`per_category` rows of each category on average, chosen by `seed`; None keeps all rows.

    Each category is shuffled on its own (seeded by seed and name), the categories are put in a seeded order, and
    the result is rank-major: every category's first pick, then every second pick, and so on, cut at
    round(per_category x categories) rows (at least one). So a whole number k gives exactly k per category, a
    fraction gives fewer rows than categories (0.25 of 13 categories: the first picks of 3 of them, chosen by the
    seed), and the result for a smaller size is a prefix of the result for a larger one: the data-size axis grows
    one set. With strict, a category with too few rows for the size is an error; without, it gives what it has.
    """
    if per_category is None:
        return list(rows)
    if isinstance(per_category, bool) or not isinstance(per_category, (int, float)) or not per_category > 0:
        raise InputError(f"per_category must be a number > 0 (a fraction of a category allowed) or None, "
                         f"got {per_category!r}")
    groups: dict[str, list[T]] = {}
    for row in rows:
        groups.setdefault(row.category, []).append(row)
    ranks = math.ceil(per_category)
    picks = []
    for category in sorted(groups):
        group = groups[category]
        if strict and len(group) < ranks:
            raise InputError(
                f"category {category!r} has {len(group)} rows but {per_category} per category were asked; "
                "lower per_category or add rows"
            )
        order = list(range(len(group)))
        random.Random(f"{seed}:{category}").shuffle(order)  # a str seed hashes stably across processes
        picks.append([group[i] for i in order[:ranks]])
    random.Random(f"{seed}:categories").shuffle(picks)  # which categories a fractional size reaches first
    ranked = [group[rank] for rank in range(ranks) for group in picks if rank < len(group)]
    return ranked[:max(1, round(per_category * len(groups)))]


def source_present(source: str) -> bool:
    """Whether a data source is there to read (a world table or a local file); hub ids count as absent. The
    plan assumes sizes for a source that is absent, and reports an error in one that is present."""
    return source.startswith("world:") or Path(source).expanduser().exists()
