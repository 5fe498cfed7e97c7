"""The batch-size study: sweeps with tuning, regime identification, and the report.

Following You et al. 2020, "The Limit of the Batch Size", and Shallue et al. 2019, "Measuring the
Effects of Data Parallelism on Neural Network Training":

    largebatch study --recipe mnist-lenet --batch-sizes 256,1024,...,60000 --optimizers sgd,lars \\
        --epochs 30 --trials 8 --seeds 3 --storage sqlite:///runs/study.db
    largebatch report sqlite:///runs/study.db --out runs/report

Modules: `sweep` (Optuna studies in RDB storage, one training run per trial), `regimes` (B_L, B_H,
B_F from trial records, with seed confidence intervals), `report` (report.md, PNG plots, CSV).

A **trial record** is the one currency between them: a plain dict per finished training run,

    study            str    study name
    rung             str    technique: an optimizer name ("sgd", "lars", ...) or a ladder rung
                            ("sgd", "+warmup", "+tuning", "+label_smoothing", "+lars")
    batch_size       int    global batch B
    seed             int
    tuned            bool   False for the untuned linearly-scaled baseline LR of the rung, True for a
                            tuned (LR, warmup) point
    base_lr          float  LR at `reference_batch`
    reference_batch  int
    peak_lr          float  the LR actually used at B
    warmup_epochs    float
    epochs           float  training budget in epochs
    status           str    "completed" | "diverged" | "stopped" | "failed"
    test_accuracy    float | None   final test accuracy (None if not completed)
    val_accuracy     float | None   final validation accuracy (None without a validation split)
    val_loss         float | None
    test_loss        float | None
    train_loss       float | None   last logged training loss
    steps            int            optimizer steps run
    steps_to_target  int | None     first evaluated step at which test (or val) accuracy >= target
    target_accuracy  float | None
    wall_seconds     float
    run_dir          str
"""
