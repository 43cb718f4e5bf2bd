"""Every analysis of a study into one folder: what the report (misalign.report) reads.

    python analysis/run_all.py STUDY_DIR --out DIR [--budget flops --tau 0.5 --delta 0.05 --eps 0.1 --n-boot 2000]

A runnable entry point over misalign.analysis.run_all (the installed package holds the code, so `misalign report`
works from a wheel); `python -m misalign.analysis.run_all` does the same.
"""

import sys

from misalign.analysis.common import cli
from misalign.analysis.run_all import main

if __name__ == "__main__":
    sys.exit(cli(main))
