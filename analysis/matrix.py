"""The realignment matrix: what each realignment method does to each misaligned model.

    python analysis/matrix.py STUDY_DIR --out DIR [--round 1]

A runnable entry point over misalign.analysis.matrix (the installed package holds the code, so `misalign report`
works from a wheel); `python -m misalign.analysis.matrix` does the same.
"""

import sys

from misalign.analysis.common import cli
from misalign.analysis.matrix import main

if __name__ == "__main__":
    sys.exit(cli(main))
