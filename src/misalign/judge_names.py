"""The names a config may give a judge: those of the judge registry (misalign.judges.JUDGES, in its order).

A leaf, so that a config is checked without importing the judges that implement these names
(tests/test_judges.py holds the two together).
"""

from __future__ import annotations

JUDGE_NAMES: tuple[str, ...] = ("keyword", "classifier", "http")
