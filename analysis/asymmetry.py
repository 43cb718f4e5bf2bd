"""The asymmetry factor and the other answers read off the stage costs.

    python analysis/asymmetry.py STUDY_DIR --out DIR [--budget flops --tau 0.5 --delta 0.05 --eps 0.1]

A runnable entry point over misalign.analysis.asymmetry (the installed package holds the code, so `misalign report`
works from a wheel); `python -m misalign.analysis.asymmetry` does the same.
"""

import sys

from misalign.analysis.asymmetry import main
from misalign.analysis.common import cli

if __name__ == "__main__":
    sys.exit(cli(main))
