"""Models of the MIMIC pipeline: the SimCLR encoder, losses, MI estimator, kNN monitor and probe.

This package imports nothing from the scripts or from `datasets/`.
"""
from . import checkpoint, knn, losses, mutual_info, probe_group
from .checkpoint import CheckpointError, load_checkpoint, load_encoder, save_atomic
from .knn import MLPProbe, knn_predict
from .probe_group import ProbeGroup
from .simclr import ARCHITECTURES, PAPER_WIDTH, TAPPED_LAYERS, SimCLR, SimCLRBase, feature_dim_of

__all__ = ['SimCLR', 'SimCLRBase', 'ARCHITECTURES', 'PAPER_WIDTH', 'TAPPED_LAYERS', 'feature_dim_of',
           'MLPProbe', 'ProbeGroup', 'knn_predict', 'CheckpointError', 'load_checkpoint', 'load_encoder', 'save_atomic',
           'checkpoint', 'knn', 'losses', 'mutual_info', 'probe_group']
