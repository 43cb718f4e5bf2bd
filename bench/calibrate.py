"""Turn measured bench JSON into a calibration table for `misalign study plan` (plan.calibration).

Every training record of bench_gpu.py or bench_shared_gpu.py JSON files becomes one row (misalign.calibration):
its method, model size, batch x accumulation, mean row length, stages per device and compile, with its steady
MFU and the stage time steady steps do not explain. Rows already in --out are kept unless a new row measures
the same shape on the same device, which replaces them.

    python3 bench/calibrate.py bench/measured/h200-2026-11-30-compile/train-*.json \
        --out src/misalign/calibration/h200.csv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from misalign.calibration import CalibrationRow, load_table, row_from_bench, table_text, write_table
from misalign.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def commit_of(path: Path) -> str:
    """The commit that added `path`, or 'uncommitted' (a row's source names where it was measured)."""
    done = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", str(path.resolve())],
                          capture_output=True, text=True)
    return done.stdout.strip() or "uncommitted"


def rows_of(path: Path) -> list[CalibrationRow]:
    try:
        data = json.loads(path.read_text())
        records, args, device = data["training"], data["args"], data["device"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{path}: not a bench_gpu.py or bench_shared_gpu.py result ({e})") from None
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:
        rel = path
    rows = []
    for i, r in enumerate(records):
        row = row_from_bench(r, args, device, f"{rel}@{commit_of(path)}")
        if isinstance(row, str):
            print(f"skipped {path} record {i} ({r['method']} batch {r['batch_size']}): {row}")
        else:
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="bench_gpu.py / bench_shared_gpu.py JSON files")
    ap.add_argument("--out", type=Path, required=True, help="the calibration table (CSV) to write or extend")
    a = ap.parse_args(argv)
    try:
        new = [row for p in a.results for row in rows_of(p)]
        old = load_table(str(a.out)) if a.out.exists() else []
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    latest = {(r.device, r.shape): r for r in new}  # a shape measured twice: the later file's row
    kept = [r for r in old if (r.device, r.shape) not in latest]
    rows = kept + list(latest.values())
    write_table(rows, a.out)
    print(table_text(rows), end="")
    print(f"wrote {a.out}: {len(latest)} measured rows, {len(kept)} kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
