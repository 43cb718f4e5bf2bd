"""Analysis of a study's results table (STUDY/results.parquet): curves, the asymmetry factor, matrices, figures.

    common.py      loading, budgets (misalign.budget), seed averaging, the Pareto helper, writing tables/figures
    asymmetry.py   attack and defense costs, the asymmetry factor with a bootstrap over seeds, the
                   epsilon-constrained strongest attack, Pareto fronts, model-specific resistance
    curves.py      attack and defense curves, multi-round trajectories, the per-category breakdown
    matrix.py      the realignment matrix (misalign method x realign method)
    run_all.py     everything above into one folder (figures/, tables/, summary.json): what the report reads

Each module runs on a study directory: `python -m misalign.analysis.asymmetry STUDY_DIR --out DIR`, or through
the repository's thin scripts (`python analysis/asymmetry.py ...`). The code lives in the package so that
`misalign report` works from an installed wheel.
"""
