"""Loading and saving the real-world encoders in the layouts users have (docs/DESIGN.md §3.1).

Four layouts hold a `.visual` tower (models/visual.py), each read with `weights_only=True`:

- `released`: `{'state_dict': <visual weights>, ...}`, the released code's and BadEncoder's clean CLIP and ImageNet
  encoders (`model.visual.load_state_dict(checkpoint['state_dict'])`);
- `released_model`: `{'state_dict': <visual.* weights>, ...}`, BadEncoder's own output (`model.state_dict()` of
  `CLIP(...)` / `ImageNetResNet()`);
- `bare`: `<visual weights>`, a torchvision state_dict (`torch.save(resnet50().state_dict(), ...)`);
- `openai`: `<visual.* weights and the text tower>`, OpenAI's CLIP state_dict
  (`clip.load(name, jit=False)[0].state_dict()`).

The layout is read off the file (wrapped in 'state_dict' or not, `visual.` prefix or not), the family off the keys
(CLIP's attention pool or three-conv stem; a ResNet-50 is `imagenet_resnet50` in the released layouts and
`torchvision_resnet50` in a bare one; resnet34 and resnet18 by their blocks) unless it is given or recorded.
Everything besides the tower (the text tower) is kept as read, with every tensor's dtype, in a `Layout`, so that
`checkpoint_in_layout` writes a purified encoder back in the layout, key names and dtypes it came in: the
released code, BadEncoder and OpenAI's `build_model` load it as they loaded the original.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from core.errors import CheckpointError

from .checkpoint import _strip_prefix, describe_mismatch, load_encoder, read_checkpoint, save_atomic
from .visual import FAMILIES, VisualEncoder, family_of

LAYOUTS = ('released', 'released_model', 'bare', 'openai')
VISUAL_PREFIX = 'visual.'
PROJECTION_HEAD = 'projection_head'  # the extra key that keeps `g` in the released layouts
# The extra key of a resumable checkpoint in a released layout: the whole model (tower and `g`, the keys a training
# run resumes from); its 'state_dict' is the tower alone, as the released code reads it. The tensors are the same
# objects as those of 'state_dict' and 'projection_head', which torch.save stores once.
RESUME_WEIGHTS = 'encoder_state_dict'


@dataclass
class Layout:
    """What a writer needs to reproduce the file an encoder was loaded from."""
    format: str  # one of LAYOUTS
    family: str
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors beside `visual.*`, as read
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # each visual tensor's dtype in the file
    order: tuple[str, ...] = ()  # the file's keys, in its order


def split_layout(obj: dict, path: str | os.PathLike) -> tuple[str, dict, dict, dict]:
    """A file's (layout, visual weights without prefix, passthrough tensors, other checkpoint keys)."""
    wrapped = 'state_dict' in obj
    state_dict = obj['state_dict'] if wrapped else obj
    if not isinstance(state_dict, dict) or not state_dict \
            or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        keys = sorted(obj)[:8]
        raise CheckpointError(f"{path}: neither a state_dict nor a dict with a 'state_dict' of tensors (keys: {keys})")
    metadata = {key: value for key, value in obj.items() if key != 'state_dict'} if wrapped else {}
    state_dict = _strip_prefix(state_dict)
    prefixed = any(key.startswith(VISUAL_PREFIX) for key in state_dict)
    if prefixed:
        visual = {key[len(VISUAL_PREFIX):]: value for key, value in state_dict.items()
                  if key.startswith(VISUAL_PREFIX)}
        passthrough = {key: value for key, value in state_dict.items() if not key.startswith(VISUAL_PREFIX)}
    else:
        visual, passthrough = state_dict, {}
    layout = ('released_model' if prefixed else 'released') if wrapped else ('openai' if prefixed else 'bare')
    return layout, visual, passthrough, metadata


def infer_family(visual: dict, layout: str) -> str | None:
    """The family whose tower has these keys (docstring above); None when none has."""
    if 'attnpool.positional_embedding' in visual or 'conv3.weight' in visual:
        return 'clip_rn50'
    if 'layer1.0.conv3.weight' in visual:
        return 'imagenet_resnet50' if layout in ('released', 'released_model') else 'torchvision_resnet50'
    if 'layer1.2.conv1.weight' in visual:
        return 'torchvision_resnet34'
    if 'layer1.0.conv1.weight' in visual:
        return 'torchvision_resnet18'
    return None


def _load_strictly(module: torch.nn.Module, state_dict: dict, path, what: str) -> None:
    mismatch = describe_mismatch(module.state_dict(), state_dict)
    if mismatch:
        raise CheckpointError(f'{path}: does not fit {what}: {mismatch}')
    module.load_state_dict(state_dict)


def visual_encoder_from(obj: dict, path: str | os.PathLike, family: str | None = None,
                        feature_dim: int | None = None) -> tuple[VisualEncoder, dict]:
    """The VisualEncoder a loaded file describes (see `load_visual_encoder`)."""
    layout, visual, passthrough, metadata = split_layout(obj, path)
    recorded = metadata.get('family') if metadata.get('family') in FAMILIES else None
    family = family or recorded or infer_family(visual, layout)
    if family is None:
        if 'f.f.0.weight' in visual:
            raise CheckpointError(f'{path}: a CIFAR-style SimCLR checkpoint, not a real-world encoder '
                                  '(models.load_encoder loads it)')
        raise CheckpointError(f'{path}: not an encoder of a known family (first keys: {list(visual)[:3]}); '
                              f'known: {sorted(FAMILIES)}')
    family_of(family)
    model = VisualEncoder(family, feature_dim or int(metadata.get('feature_dim', 128)))
    _load_strictly(model.visual, visual, path, f'the {family} encoder')
    head = metadata.get(PROJECTION_HEAD)
    if isinstance(head, dict) and head:
        _load_strictly(model.g, head, path, f'the projection head of {family} ({PROJECTION_HEAD})')
    state_dict = _strip_prefix(obj.get('state_dict', obj))
    record = Layout(layout, family, passthrough, {key: value.dtype for key, value in visual.items()},
                    tuple(state_dict))
    return model, {**metadata, 'state_dict': visual, 'layout': record}


def load_visual_encoder(path: str | os.PathLike, family: str | None = None,
                        feature_dim: int | None = None) -> tuple[VisualEncoder, dict]:
    """Load a real-world encoder from any of the four layouts. Returns (model, checkpoint).

    `family` (a FAMILIES name) is given, else recorded in the file, else read off its keys. The checkpoint is
    the file's dict with 'state_dict' the tower's weights (no prefix) and 'layout' the `Layout` that
    `checkpoint_in_layout` reproduces. A file that does not fit is a one-line CheckpointError naming it and its
    first missing, unexpected or differently shaped keys.
    """
    return visual_encoder_from(read_checkpoint(path), path, family, feature_dim)


def load_any_encoder(path: str | os.PathLike, family: str | None = None,
                     arch: str | None = None) -> tuple[torch.nn.Module, dict]:
    """A CIFAR-style SimCLR checkpoint exactly as `models.load_encoder` loads it (`arch` checked), anything else as
    `load_visual_encoder` (with `family`, e.g. from `models.visual.resolve_family`)."""
    obj = read_checkpoint(path)
    if family is None:
        state_dict = obj.get('state_dict', obj)
        if isinstance(state_dict, dict) and 'f.f.0.weight' in _strip_prefix(state_dict):
            return load_encoder(path, arch)
    return visual_encoder_from(obj, path, family)


def checkpoint_in_layout(model: VisualEncoder, layout: Layout, *, epoch: int = 0,
                         optimizer: torch.optim.Optimizer | None = None, resumable: bool = False, **extra) -> dict:
    """What to save so that the file has `layout`'s form, keys and dtypes, with `model`'s weights.

    The released layouts are self-describing checkpoints (docs/DESIGN.md §2.4): `epoch`, `optimizer`, the model
    config (`family`, `feature_dim`), `format`, the projection head under 'projection_head' and `extra`; the
    released code reads only 'state_dict'. `resumable` adds the whole model's state_dict as RESUME_WEIGHTS, which a
    training run (`common.engine.Training.resume(..., weights=RESUME_WEIGHTS)`) continues from. The bare and openai
    layouts hold tensors only: `epoch`, `optimizer` and `extra` are not written there.
    """
    if layout.format not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout.format}', expected one of {LAYOUTS}")
    if model.family != layout.family:
        raise ValueError(f'a {model.family} encoder cannot be written in the layout of a {layout.family} file')
    visual = {key: value.detach().to(layout.dtypes.get(key, value.dtype))
              for key, value in model.visual.state_dict().items()}
    if layout.format in ('released_model', 'openai'):
        weights = {**{VISUAL_PREFIX + key: value for key, value in visual.items()}, **layout.passthrough}
    else:
        weights = visual
    if layout.order and set(layout.order) == set(weights):
        weights = {key: weights[key] for key in layout.order}
    if layout.format in ('bare', 'openai'):
        return weights
    return {'epoch': epoch, 'state_dict': weights,
            'optimizer': optimizer.state_dict() if optimizer is not None else {},
            'format': layout.format, **model.config, PROJECTION_HEAD: model.g.state_dict(),
            **({RESUME_WEIGHTS: model.state_dict()} if resumable else {}), **extra}


def save_in_layout(model: VisualEncoder, layout: Layout, path: str | os.PathLike, **kwargs) -> None:
    """`checkpoint_in_layout`, written atomically (models.save_atomic)."""
    save_atomic(checkpoint_in_layout(model, layout, **kwargs), path)


def fresh_layout(family: str, layout: str = 'released') -> Layout:
    """The layout of a file this project writes for an encoder that was not loaded from one."""
    family_of(family)
    if layout not in ('released', 'released_model', 'bare'):
        raise ValueError(f"layout '{layout}' needs the file it was read from (its text tower)")
    return Layout(layout, family)


__all__ = ['LAYOUTS', 'RESUME_WEIGHTS', 'Layout', 'split_layout', 'infer_family', 'load_visual_encoder', 'load_any_encoder',
           'visual_encoder_from', 'checkpoint_in_layout', 'save_in_layout', 'fresh_layout']
