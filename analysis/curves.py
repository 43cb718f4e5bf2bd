"""Attack and defense curves, multi-round trajectories and the per-category breakdown.

    python analysis/curves.py STUDY_DIR --out DIR [--budget flops]

A runnable entry point over misalign.analysis.curves (the installed package holds the code, so `misalign report`
works from a wheel); `python -m misalign.analysis.curves` does the same.
"""

import sys

from misalign.analysis.common import cli
from misalign.analysis.curves import main

if __name__ == "__main__":
    sys.exit(cli(main))
