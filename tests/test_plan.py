"""`largebatch plan`: each part against hand-computed values, the CLI, the published check, a gloo calibration."""

import csv
import math
import re
from pathlib import Path

import pytest
import torch

from largebatch.cli import main
from largebatch.config import ConfigError
from largebatch.plan import comm, compute, convergence, hardware, planner
from largebatch.plan.calibrate import fit_alpha_beta, measure_allreduce

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def profile(**kw) -> hardware.Profile:
    data = {"name": "test", "peak_flops": 1e12, "efficiency": 0.5, "half_batch": 0, "memory_bandwidth": 1e11,
            "grad_bytes": 4, "topology": "ring", "chips_per_node": 8,
            "levels": [{"name": "link", "bandwidth": 1e9, "latency": 1e-5}]}
    return hardware.profile_from_dict({**data, **kw}, "test profile")


# ------------------------------------------------------------------ communication

def test_ring_allreduce_is_2_p_minus_1_alphas_plus_2_p_minus_1_over_p_n_beta():
    # p = 4: 2*3*1e-5 + 2*3/4 * 1e6 / 1e9 = 6e-5 + 1.5e-3
    assert comm.ring_allreduce(1e6, 4, 1e-5, 1e9) == pytest.approx(1.56e-3)
    assert comm.ring_reduce_scatter(1e6, 4, 1e-5, 1e9) == pytest.approx(0.78e-3)
    assert comm.ring_allreduce(1e6, 1, 1e-5, 1e9) == 0


def test_tree_allreduce_is_2_ceil_log2_p_rounds():
    # p = 8 and p = 5 both take ceil(log2 p) = 3 rounds each way: 2*3*(1e-5 + 1e6/1e9)
    assert comm.tree_allreduce(1e6, 8, 1e-5, 1e9) == pytest.approx(6.06e-3)
    assert comm.tree_allreduce(1e6, 5, 1e-5, 1e9) == pytest.approx(6.06e-3)


def test_torus2d_reduces_along_one_dimension_then_the_other():
    # 2 x 3, no latency: RS + AG along a=2 of 1.2e6 bytes: 2 * (1/2 * 1.2e6 / 1e9) = 1.2e-3;
    # all-reduce of the 6e5-byte shard along b=3: 2 * (2/3) * 6e5 / 1e9 = 0.8e-3
    assert comm.torus2d_allreduce(1.2e6, 2, 3, 0.0, 1e9) == pytest.approx(2.0e-3)


def test_hierarchical_uses_the_fast_level_inside_the_node_and_the_cheaper_algorithm_across():
    intra, inter = hardware.Level("nvlink", 1e11, 1e-6), hardware.Level("ib", 1e10, 1e-5)
    # inside (k=8): RS + AG = 2 * (7e-6 + 7/8 * 8e6 / 1e11) = 1.54e-4
    # across (m=4) on the 1e6-byte shard: ring 2*3*1e-5 + 1.5 * 1e6/1e10 = 2.1e-4 < tree 2*2*(1e-5 + 1e-4) = 4.4e-4
    assert comm.hierarchical_allreduce(8e6, 8, 4, intra, inter) == pytest.approx(1.54e-4 + 2.1e-4)


def test_parameter_server_link_carries_p_over_s_workers():
    # push + pull, 8 workers over 2 servers: 2 * (1e-5 + 4 * 1e6 / 1e9)
    assert comm.parameter_server(1e6, 8, 1e-5, 1e9, servers=2) == pytest.approx(8.02e-3)


def test_allreduce_time_dispatches_on_the_topology_and_flat_ones_run_at_the_slow_level():
    p = profile(topology="hierarchical", chips_per_node=2,
                levels=[{"name": "fast", "bandwidth": 1e11, "latency": 0}, {"name": "slow", "bandwidth": 1e9,
                                                                               "latency": 0}])
    # ring over 4 chips on 2 nodes runs at the slow level: 2 * 3/4 * 1e6 / 1e9
    assert comm.allreduce_time(1e6, 4, p, "ring") == pytest.approx(1.5e-3)
    # hierarchical: 2 * (1/2 * 1e6 / 1e11) inside + ring of 5e5 bytes over 2 nodes: 2 * 1/2 * 5e5 / 1e9
    assert comm.allreduce_time(1e6, 4, p) == pytest.approx(1e-5 + 5e-4)
    with pytest.raises(ConfigError, match="unknown"):
        comm.allreduce_time(1e6, 4, p, "mesh")


def test_buckets_and_overlap():
    assert comm.bucket_sizes(60 * MIB) == [25 * MIB, 25 * MIB, 10 * MIB]
    # buckets of 1, 1, 2 bytes ready at 0.25, 0.5, 1.0 of a 1 s backward: finish 0.35, 0.6, 1.5 -> 0.5 s exposed
    assert comm.exposed_time([1, 1, 2], [0.1, 0.1, 0.5], 1.0) == pytest.approx(0.5)
    # slow buckets queue: ready 0.5, 1.0; finish 1.5, 2.5 -> 1.5 s exposed
    assert comm.exposed_time([1, 1], [1.0, 1.0], 1.0) == pytest.approx(1.5)
    assert comm.exposed_time([1, 1], [0.1, 0.1], 1.0) == pytest.approx(0.1)


def test_torus_shape_is_the_most_square_slice():
    assert comm.torus_shape(1024, (32, 32)) == (32, 32)
    assert comm.torus_shape(8, (32, 32)) == (2, 4)
    with pytest.raises(ConfigError, match="slice"):
        comm.torus_shape(7, (4, 4))


# ------------------------------------------------------------------ compute

def test_step_compute_time_is_flops_times_b_plus_h_over_peak_times_efficiency():
    # 1e9 FLOPs * (16 + 16) / (1e12 * 0.5)
    assert compute.step_compute_time(1e9, 16, 1e12, 0.5, 16) == pytest.approx(0.064)


def test_fit_line_recovers_intercept_and_slope():
    batches = [8, 32, 128]
    a, c = compute.fit_line(batches, [0.02 + 0.001 * b for b in batches])
    assert (a, c) == (pytest.approx(0.02), pytest.approx(0.001))


def test_count_flops_counts_forward_and_backward_per_example():
    # fwd 2*10*5 + 2*5*2 = 120; bwd: layer 2 weight and input grads 20 + 20, layer 1 weight grad 100 (the input
    # needs no grad) -> 260 per example; 50 + 10 parameters
    flops, params = compute.count_flops(
        lambda: torch.nn.Sequential(torch.nn.Linear(10, 5, bias=False), torch.nn.Linear(5, 2, bias=False)),
        lambda n: torch.randn(n, 10))
    assert (flops, params) == (260, 60)


# ------------------------------------------------------------------ steps to target

def test_mlperf_reference_points():
    c = convergence.mlperf_resnet()
    assert c.epochs(32768) == pytest.approx(56.0)  # rcps_resnet.json resnet_ref_32768: mean of its 10 runs
    assert c.epochs(1000) == pytest.approx(35.0)  # below the smallest reference batch (1,632): its epochs
    assert c.epochs(math.sqrt(1632 * 3264)) == pytest.approx(35.1)  # halfway in log B between 35.0 and 35.2
    assert c.epochs(200_000) is None


def test_mccandlish_noise_scale():
    c = convergence.from_noise_scale(1000, reference_batch=1000, reference_epochs=10)
    # E_min = 10 / (1 + 1000/1000) = 5; E(3000) = 5 * (1 + 3000/1000) = 20, i.e. 20*60000/3000 = 400 steps
    # = S_min (1 + B_noise/B) with S_min = 5*60000/1000 = 300: 300 * (1 + 1/3) = 400
    assert c.epochs(3000) == pytest.approx(20)
    with pytest.raises(ConfigError):
        convergence.from_noise_scale(0, 1000, 10)


def test_study_steps_to_target_from_the_committed_mnist_study():
    c = convergence.read_study(ROOT / "benchmarks/results/mnist-study", 60000)
    # batch 2048: sgd trial 4 reaches 0.99 in 147, 293, 147 steps (median 147), the fewest of the batch's trials
    assert c.epochs(2048) == pytest.approx(147 * 2048 / 60000)
    assert c.epochs(256) == pytest.approx(2110 * 256 / 60000)
    assert c.epochs(32768) is None  # above regimes.json's B_H = 16384


# ------------------------------------------------------------------ planner

def workload(epochs: float = 10) -> planner.Workload:
    return planner.Workload("w", flops_per_example=1e9, params=1_000_000, dataset_size=100_000,
                            convergence=convergence.fixed(epochs))


def test_point_adds_compute_exposed_communication_and_optimizer():
    r = planner.point(workload(), profile(), chips=4, batch=64)
    # compute 1e9 * 16 / (1e12 * 0.5) = 0.032; one 4e6-byte bucket, ready at the end of the backward: all of
    # 2*3*1e-5 + 1.5 * 4e6/1e9 = 6.06e-3 exposed; optimizer 1e6 * 20 / 1e11 = 2e-4; 10 * 1e5 / 64 = 15,625 steps
    assert r.compute_s == pytest.approx(0.032)
    assert r.exposed_comm_s == pytest.approx(6.06e-3)
    assert r.optimizer_s == pytest.approx(2e-4)
    assert r.steps == 15625
    assert r.time_to_train_s == pytest.approx(15625 * 0.03826)
    assert r.chip_hours == pytest.approx(4 * 15625 * 0.03826 / 3600)


def test_weight_update_sharding_and_bf16_gradients():
    sharded = planner.point(workload(), profile(), 4, 64, planner.Options(shard_weights=True))
    # reduce-scatter 3e-5 + 0.75 * 4e6/1e9 = 3.03e-3 after the backward, then the all-gather, as much again
    assert sharded.exposed_comm_s == pytest.approx(6.06e-3)
    assert sharded.optimizer_s == pytest.approx(2e-4 / 4)
    half = planner.point(workload(), profile(), 4, 64, planner.Options(grad_bytes=2))
    assert half.exposed_comm_s == pytest.approx(6e-5 + 1.5 * 2e6 / 1e9)


def test_impossible_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match="smaller than 8 chips"):
        planner.point(workload(), profile(), chips=8, batch=4)
    with pytest.raises(ConfigError, match="zero bandwidth"):
        profile(levels=[{"name": "link", "bandwidth": 0, "latency": 1e-5}])
    with pytest.raises(ConfigError, match="topology"):
        profile(topology="mesh")
    with pytest.raises(ConfigError, match="smaller than every chip count"):
        planner.plan(workload(), profile(), chips=[64], batches=[8, 16])


def test_best_and_frontier():
    rows = planner.plan(workload(), profile(), chips=[1, 4, 16], batches=[64])
    times = {r.chips: r.time_to_train_s for r in rows}
    assert times[16] < times[4] < times[1]
    assert planner.best(rows).chips == 16
    assert planner.best(rows, max_chips=4).chips == 4
    cheapest = min(r.chip_hours for r in rows)
    assert planner.best(rows, budget_chip_hours=cheapest).chip_hours == cheapest
    front = planner.frontier(rows)
    assert [r.chips for r in front] == sorted((r.chips for r in front), reverse=True)
    assert all(a.chip_hours > b.chip_hours for a, b in zip(front, front[1:]))


def test_builtin_profiles_load():
    names = hardware.builtin_profiles()
    assert {"h100", "a100", "v100", "tpu-v3", "knl-7250", "skx-8160"} <= set(names)
    assert hardware.load_profile("h100").levels[-1].bandwidth == 50e9  # 400 Gb/s per GPU


# ------------------------------------------------------------------ command line

def test_check_published_prints_every_run_within_2x(capsys):
    assert main(["plan", "--check-published"]) == 0
    out = capsys.readouterr().out
    ratios = [float(x) for x in re.findall(r" (\d+\.\d\d)x$", out, re.M)]
    assert len(ratios) >= 6
    assert all(0.5 <= r <= 2 for r in ratios), out


def test_plan_writes_table_csv_and_plots(tmp_path, capsys):
    assert main(["plan", "--recipe", "mnist-lenet", "--profile", "a100", "--chips", "1,8", "--batch-sizes",
                 "256,4096", "--max-chips", "8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fastest within 8 chips" in out
    rows = list(csv.DictReader(open(tmp_path / "plan.csv")))
    assert [(int(r["chips"]), int(r["batch"])) for r in rows] == [(1, 256), (8, 256), (1, 4096), (8, 4096)]
    assert float(rows[0]["epochs"]) == 30  # the recipe's fixed budget
    assert (tmp_path / "time_to_train.png").stat().st_size > 0 and (tmp_path / "frontier.png").stat().st_size > 0


def test_integer_lists_merge_sizes_but_keep_a_shape_in_order():
    """--chips and --batch-sizes are sets (sorted, each once); --input-shape is C,H,W as given (1,28,28 is not 1,28);
    a study refuses a repeated batch size, which would count its runs twice."""
    from largebatch.cli import int_list
    from largebatch.config import ConfigError

    assert int_list("--chips", "8,64", "merge")("64,8,8") == (8, 64)
    assert int_list("--input-shape", "3,224,224", "keep")("1,28,28") == (1, 28, 28)
    with pytest.raises(ConfigError, match="--batch-sizes '64,64' lists 64 more than once"):
        int_list("--batch-sizes", "256,1024")("64,64")
    with pytest.raises(ConfigError, match="--input-shape '3,x' is invalid: give comma-separated integers"):
        int_list("--input-shape", "3,224,224", "keep")("3,x")


def test_plan_of_a_user_data_set_takes_its_input_shape(tmp_path, capsys):
    assert main(["plan", "--recipe", "mnist-lenet", "--profile", "a100", "--chips", "1", "--batch-sizes", "256",
                 "--dataset-size", "50000", "--input-shape", "1,28,28", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "plan.csv")))
    assert [(int(r["chips"]), int(r["batch"])) for r in rows] == [(1, 256)]


@pytest.mark.parametrize("args, message", [
    (["--chips", "512", "--batch-sizes", "256"], "smaller than every chip count"),
    (["--profile", "nope"], "no such built-in profile"),
    (["--chips", "0"], "--chips"),
])
def test_plan_bad_input_is_one_line_exit_2(args, message, capsys):
    assert main(["plan", "--recipe", "mnist-lenet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ------------------------------------------------------------------ calibration

def test_fit_alpha_beta_inverts_the_ring_model():
    # p = 2: t = 2 alpha + n / bw; alpha = 50 us, bw = 2 GB/s
    sizes = [4096, 65536, 1 << 20]
    times = [2 * 50e-6 + n / 2e9 for n in sizes]
    alpha, bw = fit_alpha_beta(sizes, times, 2)
    assert (alpha, bw) == (pytest.approx(50e-6), pytest.approx(2e9))


def test_gloo_allreduce_across_two_processes():
    times = measure_allreduce(2, sizes=(4096, 1 << 20), repeats=3)
    assert len(times) == 2 and all(t > 0 for t in times)
