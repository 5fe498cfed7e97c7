"""The cost of the gradient all-reduce: alpha-beta models of the collectives, bucketing and overlap.

A message of n bytes over a link of latency alpha (s) and bandwidth bw (bytes/s, beta = 1/bw s/byte). For p chips
(Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication operations in MPICH"; Patarasuk &
Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of workstations"; Chan et al. 2007, "Collective
communication: theory, practice, and experience"):

    ring reduce-scatter = ring all-gather  = (p-1) alpha + (p-1)/p n beta
    ring all-reduce (reduce-scatter + all-gather) = 2(p-1) alpha + 2(p-1)/p n beta
    tree all-reduce (binomial reduce + broadcast) = 2 ceil(log2 p) (alpha + n beta)
    2-D torus a x b (Ying et al. 2018, "Image classification at supercomputer scale"): reduce-scatter along the
        first dimension, all-reduce of the n/a shard along the second, all-gather along the first
    hierarchical, k chips per node x m nodes (Goyal et al. 2017; NCCL): reduce-scatter inside the node, all-reduce
        of the n/k shard across nodes (ring or tree, the cheaper, as NCCL picks), all-gather inside the node
    parameter server with s servers (Li et al. 2014, "Scaling distributed machine learning with the parameter
        server"): every worker pushes n and pulls n; a server link carries p/s of them: 2 (alpha + max(1, p/s) n beta)

Overlap (Li et al. 2020, "PyTorch Distributed: experiences on accelerating data parallel training"): DDP groups the
gradients into buckets of 25 MB in the order the backward pass produces them and all-reduces each bucket as soon
as it is ready, one after the other; only what is left after the backward pass ends is exposed.
"""

from __future__ import annotations

import math
from typing import Sequence

from largebatch.config import ConfigError
from largebatch.plan.hardware import Level, Profile

TOPOLOGIES = ("ring", "tree", "torus2d", "hierarchical", "parameter-server")
"""How the gradient all-reduce runs (the one list of the names; see the module docstring for each one's cost)."""

DDP_BUCKET_BYTES = 25 * 2**20
"""PyTorch DDP's default bucket_cap_mb = 25."""


def ring_reduce_scatter(n: float, p: int, alpha: float, bw: float) -> float:
    """Ring reduce-scatter (= ring all-gather) of n bytes over p chips: (p-1) alpha + (p-1)/p n / bw (Thakur et al.
    2005)."""
    return 0.0 if p <= 1 else (p - 1) * alpha + (p - 1) / p * n / bw


def ring_allreduce(n: float, p: int, alpha: float, bw: float) -> float:
    """Ring all-reduce of n bytes over p chips: 2(p-1) alpha + 2(p-1)/p n / bw (Patarasuk & Yuan 2009)."""
    return 2 * ring_reduce_scatter(n, p, alpha, bw)


def tree_allreduce(n: float, p: int, alpha: float, bw: float) -> float:
    """Binomial-tree reduce then broadcast of n bytes over p chips: 2 ceil(log2 p) (alpha + n / bw) (Chan et al.
    2007; Thakur et al. 2005)."""
    return 0.0 if p <= 1 else 2 * math.ceil(math.log2(p)) * (alpha + n / bw)


def torus2d_allreduce(n: float, a: int, b: int, alpha: float, bw: float) -> float:
    """2-D torus all-reduce on a x b chips (Ying et al. 2018): reduce-scatter along a, all-reduce of the n/a shard
    along b, all-gather along a."""
    return 2 * ring_reduce_scatter(n, a, alpha, bw) + ring_allreduce(n / a, b, alpha, bw)


def hierarchical_allreduce(n: float, k: int, m: int, intra: Level, inter: Level) -> float:
    """k chips per node x m nodes: intra-node reduce-scatter, inter-node all-reduce of the n/k shard (the cheaper of
    ring and tree), intra-node all-gather (Goyal et al. 2017; NCCL's hierarchical algorithms)."""
    across = min(ring_allreduce(n / k, m, inter.latency, inter.bandwidth),
                 tree_allreduce(n / k, m, inter.latency, inter.bandwidth))
    return 2 * ring_reduce_scatter(n, k, intra.latency, intra.bandwidth) + across


def parameter_server(n: float, p: int, alpha: float, bw: float, servers: int) -> float:
    """Push n bytes to the servers and pull n back, a server link shared by p/servers workers (Li et al. 2014)."""
    return 0.0 if p <= 1 else 2 * (alpha + max(1.0, p / servers) * n / bw)


def torus_shape(p: int, limit: tuple[int, int]) -> tuple[int, int]:
    """The most square a x b = p slice of a torus of at most limit[0] x limit[1] chips."""
    shapes = [(a, p // a) for a in range(1, p + 1) if p % a == 0 and a <= limit[0] and p // a <= limit[1]]
    if not shapes:
        raise ConfigError(f"{p} chips do not form a slice of the {limit[0]} x {limit[1]} torus: choose a product "
                          f"a x b with a <= {limit[0]} and b <= {limit[1]}")
    return min(shapes, key=lambda s: (abs(s[0] - s[1]), s))


def _flat_level(p: int, profile: Profile) -> Level:
    """The link a flat (single-level) algorithm runs at: the fastest within a node, else the slowest."""
    return profile.levels[0] if p <= profile.chips_per_node else profile.levels[-1]


def allreduce_time(n: float, p: int, profile: Profile, topology: str | None = None, servers: int = 1) -> float:
    """Seconds to all-reduce n bytes over p chips of `profile` by `topology` (default: the profile's)."""
    topology = topology or profile.topology
    if topology not in TOPOLOGIES:
        raise ConfigError(f"topology {topology!r} is unknown: use one of {', '.join(TOPOLOGIES)}")
    if p <= 1:
        return 0.0
    if topology == "torus2d":
        a, b = torus_shape(p, profile.torus or (p, p))
        lv = profile.levels[0]
        return torus2d_allreduce(n, a, b, lv.latency, lv.bandwidth)
    if topology == "hierarchical" and len(profile.levels) >= 2:
        k = min(p, profile.chips_per_node)
        return hierarchical_allreduce(n, k, math.ceil(p / k), profile.levels[0], profile.levels[-1])
    lv = _flat_level(p, profile)
    if topology == "tree":
        return tree_allreduce(n, p, lv.latency, lv.bandwidth)
    if topology == "parameter-server":
        return parameter_server(n, p, lv.latency, lv.bandwidth, servers)
    return ring_allreduce(n, p, lv.latency, lv.bandwidth)


def reduce_scatter_time(n: float, p: int, profile: Profile, topology: str | None = None) -> float:
    """Seconds of the reduce-scatter half of the all-reduce (= the all-gather half): for weight-update sharding
    (Ying et al. 2018; Xu et al. 2020, "Automatic cross-replica sharding of weight update in data-parallel
    training"). Ring-based for every topology: a tree or a parameter server has no reduce-scatter of its own."""
    topology = topology or profile.topology
    if p <= 1:
        return 0.0
    if topology == "torus2d":
        a, b = torus_shape(p, profile.torus or (p, p))
        lv = profile.levels[0]
        return ring_reduce_scatter(n, a, lv.latency, lv.bandwidth) + ring_reduce_scatter(n / a, b, lv.latency,
                                                                                          lv.bandwidth)
    if topology == "hierarchical" and len(profile.levels) >= 2:
        k = min(p, profile.chips_per_node)
        intra, inter = profile.levels[0], profile.levels[-1]
        return (ring_reduce_scatter(n, k, intra.latency, intra.bandwidth)
                + ring_reduce_scatter(n / k, math.ceil(p / k), inter.latency, inter.bandwidth))
    lv = _flat_level(p, profile)
    return ring_reduce_scatter(n, p, lv.latency, lv.bandwidth)


def bucket_sizes(n: float, bucket_bytes: float = DDP_BUCKET_BYTES) -> list[float]:
    """n bytes of gradients cut into buckets of `bucket_bytes` (the last one smaller), as DDP does."""
    if n <= 0:
        return []
    full = int(n // bucket_bytes)
    rest = n - full * bucket_bytes
    return [float(bucket_bytes)] * full + ([rest] if rest > 0 else [])


def exposed_time(sizes: Sequence[float], costs: Sequence[float], backward: float) -> float:
    """Communication left after a backward pass of `backward` seconds, bucket i (of `sizes` bytes, taking `costs[i]`
    seconds) ready when the backward has produced its share of the bytes, buckets sent one after the other (Li et
    al. 2020): finish_i = max(ready_i, finish_{i-1}) + cost_i; exposed = max(0, finish_last - backward)."""
    total, done, finish = float(sum(sizes)), 0.0, 0.0
    for size, cost in zip(sizes, costs):
        done += size
        finish = max(finish, backward * done / total) + cost
    return max(0.0, finish - backward)
