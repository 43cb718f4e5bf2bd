"""Check a grid design before paying for it: simulate studies from known dose-response curves and print how
well the asymmetry factor would be known.

    python analysis/design_check.py --grid 1,3,10 --seeds 3 [--defense-grid 1,3,10 --true-a 1.7 --true-d 5.5]

A runnable entry point over misalign.analysis.synthetic (the installed package holds the code);
`python -m misalign.analysis.synthetic` does the same.
"""

import sys

from misalign.analysis.common import cli
from misalign.analysis.synthetic import main

if __name__ == "__main__":
    sys.exit(cli(main))
