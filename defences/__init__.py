"""Backdoor defences for pre-trained encoders, all under MIMIC's threat model: the defender holds the suspect
encoder and a small clean, unlabelled subset D of its pre-training set, nothing else (no labels, no poisoned
data, no trigger).

MIMIC (`defences.mimic`) and the eight baselines are each one module with one interface, `purify(suspect, clean,
run) -> (purified encoder, report)` and the attributes the stage-2 driver (`defences.stage`) reads; `MIMIC.py` and
`baseline_defence.py` are the two command lines over that driver (`baselines` holds the latter's flags):

| name | module | method |
|---|---|---|
| mimic | `defences.mimic` | MIMIC (Han et al., IEEE TIFS 2025): MI-guided distillation into a fresh student |
| ft | `defences.ft` | fine-tuning: SimCLR (NT-Xent) training of the suspect on D |
| fp | `defences.fp` | Fine-Pruning (Liu et al., RAID 2018), label-free stopping rule |
| nad | `defences.nad` | Neural Attention Distillation (Li et al., ICLR 2021) |
| clp | `defences.clp` | Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022), data-free |
| anp | `defences.anp` | Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), NT-Xent as its loss |
| kd | `defences.kd` | plain knowledge distillation into a fresh student (Saha et al., CVPR 2022) |
| invert | `defences.invert` | DECREE's trigger inversion and verdict (CVPR 2023), then trigger-augmented fine-tuning |
| sslcleanse | `defences.sslcleanse` | DECREE's inversion, then SSL-Cleanse's mitigation (ECCV 2024): distillation from the suspect |

Every purified encoder is a plain SimCLR state_dict: pruned channels are zeroed weights, never extra modules.
"""
from __future__ import annotations

import importlib

BASELINES = ('ft', 'fp', 'nad', 'clp', 'anp', 'kd', 'invert', 'sslcleanse')
TRAINING_BASELINES = ('ft', 'fp', 'nad', 'kd', 'invert', 'sslcleanse')  # the ones that train weights for --epochs


def get_defence(name: str):
    """The module of baseline `name` (imported on demand)."""
    if name not in BASELINES:
        raise ValueError(f"unknown defence '{name}', expected one of {', '.join(BASELINES)}")
    return importlib.import_module(f'{__name__}.{name}')
