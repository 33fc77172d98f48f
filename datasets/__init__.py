"""Datasets of the MIMIC pipeline: registry, npz loading, transforms, triggers, torch Datasets, and the training
data path (`datasets.fastpath`: the tensor path's device batches, or the per-image path's DataLoaders of
`datasets.loaders`; imported by name, not here).

Command-line tools: `python -m datasets.prepare` (prepared npz sets), `python -m datasets.poison` (a poisoned
copy of a pre-training split; not imported here, it builds on core.cli).
"""
from .folders import ImagesAtSize, ImageTask, is_image_folder, read_task, resize_images
from .npz import load_images, load_split, read_npz
from .registry import (DATASETS, DataError, DatasetInfo, default_data_dir, get_info, pretraining_names,
                       split_path)
from .torch_datasets import ImagePairs, LabeledImages, ShadowImages, triggered_copy
from .transforms import finetune_transform, normalize_batch, simclr_transform, test_transform
from .triggers import Reference, Trigger, apply_trigger, load_reference, load_trigger

__all__ = ['DATASETS', 'DataError', 'DatasetInfo', 'default_data_dir', 'get_info', 'pretraining_names',
           'split_path', 'load_split', 'load_images', 'read_npz', 'ImagesAtSize', 'ImageTask', 'is_image_folder',
           'read_task', 'resize_images', 'ImagePairs', 'LabeledImages', 'ShadowImages',
           'triggered_copy', 'finetune_transform', 'normalize_batch', 'simclr_transform',
           'test_transform', 'Reference', 'Trigger', 'apply_trigger', 'load_reference', 'load_trigger']
