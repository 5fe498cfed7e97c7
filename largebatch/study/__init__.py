"""The batch-size study: sweeps with tuning, regime identification, and the report, on any task's metric.

Following You et al. 2020, "The Limit of the Batch Size", and Shallue et al. 2019, "Measuring the
Effects of Data Parallelism on Neural Network Training":

    largebatch study --recipe mnist-lenet --batch-sizes 256,1024,...,60000 --optimizers sgd,lars \\
        --epochs 30 --trials 8 --seeds 3 --storage sqlite:///runs/study.db
    largebatch study --recipe-file my_recipe.py --batch-sizes 64,512 --optimizers sgd,adam ...
    largebatch report sqlite:///runs/study.db --out runs/report

A study is decided on its task's primary metric and direction (`largebatch.tasks`): accuracy, higher is
better, for classification; the loss, lower is better, for regression and language models.

Modules: `recipe` (where the base config comes from: a named recipe, a recipe file, an import path; the
task's metric), `spec` (StudySpec, rungs, each cell's config, the tuning grid), `runs` (one training run
-> one record), `sweep` (Optuna studies in RDB storage, one training run per seed of a trial),
`regimes` (B_L, B_H, B_F from trial records, with seed confidence intervals; pure), `stats` (seed means
and Student-t intervals), `plots` and `report` (report.md, PNG plots, trials.csv, regimes.json).

A **trial record** (`record.TrialRecord`, a frozen dataclass) is the one currency between them: one per
training run, written by the sweep, stored in Optuna, written to and read from trials.csv, and read by
the regimes. Its fields are the schema.
"""
