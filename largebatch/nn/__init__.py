"""Normalisation layers for large-batch training: ghost batch norm (Hoffer et al. 2017) and batch norm
pooled over a group of replicas (the "BN span" of Ying et al. 2018)."""

from largebatch.nn.cross_replica_bn import CrossReplicaBatchNorm, convert_cross_replica_bn
from largebatch.nn.ghost_bn import GhostBatchNorm, convert_ghost_bn

__all__ = ["CrossReplicaBatchNorm", "GhostBatchNorm", "convert_cross_replica_bn", "convert_ghost_bn"]
