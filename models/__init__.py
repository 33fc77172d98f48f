"""Models of the MIMIC pipeline: the SimCLR encoder, the real-world encoders (CLIP RN50, ImageNet and torchvision
ResNets), losses, MI estimator, kNN monitor and probe.

This package imports nothing from the scripts or from `datasets/`.
"""
from . import checkpoint, knn, losses, mutual_info, probe_group, visual, visual_checkpoint
from .checkpoint import CheckpointError, load_checkpoint, load_encoder, save_atomic
from .knn import MLPProbe, knn_predict
from .probe_group import ProbeGroup
from .simclr import (ARCHITECTURES, PAPER_WIDTH, RAW_INPUTS, TAPPED_LAYERS, SimCLR, SimCLRBase, feature_dim_of,
                     input_normalization)
from .visual import (FAMILIES, USAGE_INFO_FAMILIES, VisualEncoder, build_encoder, encoder_input_size, encoder_normalization,
                     resolve_family)
from .visual_checkpoint import Layout, checkpoint_in_layout, load_any_encoder, load_visual_encoder, save_in_layout

__all__ = ['SimCLR', 'SimCLRBase', 'RAW_INPUTS', 'input_normalization', 'ARCHITECTURES', 'PAPER_WIDTH', 'TAPPED_LAYERS', 'feature_dim_of',
           'MLPProbe', 'ProbeGroup', 'knn_predict', 'CheckpointError', 'load_checkpoint', 'load_encoder', 'save_atomic',
           'FAMILIES', 'USAGE_INFO_FAMILIES', 'VisualEncoder', 'build_encoder', 'encoder_input_size', 'encoder_normalization', 'resolve_family', 'Layout', 'checkpoint_in_layout',
           'load_any_encoder', 'load_visual_encoder', 'save_in_layout',
           'checkpoint', 'knn', 'losses', 'mutual_info', 'probe_group', 'visual', 'visual_checkpoint']
