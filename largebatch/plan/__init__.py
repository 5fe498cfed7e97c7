"""`largebatch plan`: time to train over chip counts and batch sizes, from a model, a machine and steps to target.

    from largebatch.plan import Workload, Options, load_profile, plan, best, frontier, fixed
    w = Workload("mynet", flops_per_example=3 * 2 * 25e6, params=25_000_000, dataset_size=1_000_000,
                 convergence=fixed(30))
    rows = plan(w, load_profile("h100"), chips=[8, 64, 512], batches=[1024, 8192, 65536])
    print(best(rows, max_chips=64))

Parts (each a module): `hardware` (profiles), `compute` (FLOPs, step compute time), `comm` (collectives, bucketing,
overlap), `convergence` (epochs to target vs batch), `planner` (step time, time to train, best, frontier),
`workload` (a recipe's model and data), `published` (the check against published runs), `calibrate` (measure this
machine), `plots`, `cli`.
"""

from largebatch.plan.convergence import Convergence, fixed, from_noise_scale, mlperf_resnet
from largebatch.plan.hardware import Profile, builtin_profiles, load_profile
from largebatch.plan.planner import Options, Row, Workload, best, frontier, plan, point

__all__ = ["Convergence", "fixed", "from_noise_scale", "mlperf_resnet", "Profile", "builtin_profiles",
           "load_profile", "Options", "Row", "Workload", "best", "frontier", "plan", "point"]
