"""Batched tensor versions of the pipeline's augmentations, for data kept on the device.

The PIL transforms of `datasets.transforms` run per image in worker processes; on a GPU that makes the
loader the bottleneck. These functions augment a whole uint8 batch (B, H, W, 3) at once, drawing every random
parameter from the same distributions as torchvision's transforms:
- RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)): up to 10 attempts per image at area·U(scale) and
  log-uniform aspect ratio, the first that fits; otherwise the centre crop with the ratio clamped. Resampled
  bilinearly (output pixel centres mapped onto the crop box, as PIL's bilinear resize);
- horizontal flip with p = 0.5;
- ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8: brightness, contrast, saturation ∈ U(0.6, 1.4) and hue ∈
  U(−0.1, 0.1), the four applied in an order drawn per image (torchvision's randperm(4));
- RandomGrayscale with p = 0.2 (ITU-R 601-2 luma, as torchvision).
The colour operations follow `torchvision.transforms.functional` on float tensors; the PIL path rounds to
uint8 after each operation, so single pixels may differ by one grey level while the distributions agree
(tests/datasets/test_tensor_augment.py checks both).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_FLIP = 0.8, 0.2, 0.5
LUMA = (0.299, 0.587, 0.114)


def _uniform(shape, low, high, generator, device):
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def crop_boxes(batch: int, height: int, width: int, generator: torch.Generator | None = None,
               device: torch.device | str = 'cpu', scale=CROP_SCALE, ratio=CROP_RATIO,
               attempts: int = 10) -> torch.Tensor:
    """(B, 4) integer boxes (top, left, h, w) drawn as torchvision's RandomResizedCrop.get_params."""
    area = height * width
    target_area = area * _uniform((batch, attempts), scale[0], scale[1], generator, device)
    log_ratio = _uniform((batch, attempts), math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, attempts)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((batch,), -1, device=device))
    # fallback: centre crop of the whole image with the aspect ratio clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    index = first.clamp(min=0).unsqueeze(1)
    h = torch.where(first >= 0, h.gather(1, index).squeeze(1), torch.full_like(first, fh, dtype=h.dtype))
    w = torch.where(first >= 0, w.gather(1, index).squeeze(1), torch.full_like(first, fw, dtype=w.dtype))
    # torch.randint(0, H - h + 1) per image: floor(U * (H - h + 1))
    top = torch.floor(torch.rand(batch, generator=generator, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(batch, generator=generator, device=device) * (width - w + 1))
    top = torch.where(first >= 0, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(first >= 0, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop float images (B, C, H, W) to `boxes` (B, 4: top, left, h, w) and resize to size×size (bilinear)."""
    batch, _, height, width = images.shape
    boxes = boxes.to(images.dtype)
    top, left, h, w = boxes.unbind(1)
    steps = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size  # (S,)
    # source pixel coordinates of the output pixel centres, then to grid_sample's [-1, 1]
    ys = top[:, None] + steps[None] * h[:, None] - 0.5  # (B, S)
    xs = left[:, None] + steps[None] * w[:, None] - 0.5
    # PIL crops first, so the resampling never reaches outside the box: clamp to its edge pixels
    ys = torch.minimum(torch.maximum(ys, top[:, None]), (top + h - 1)[:, None])
    xs = torch.minimum(torch.maximum(xs, left[:, None]), (left + w - 1)[:, None])
    ys = (ys + 0.5) / height * 2 - 1
    xs = (xs + 0.5) / width * 2 - 1
    grid = torch.stack([xs[:, None, :].expand(batch, size, size), ys[:, :, None].expand(batch, size, size)], -1)
    return F.grid_sample(images, grid, mode='bilinear', padding_mode='border', align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> luma (B, 1, H, W)."""
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.view(-1, 1, 1, 1)
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images, factor):
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images, factor):
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean.expand_as(images), factor)


def adjust_saturation(images, factor):
    return _blend(images, grayscale(images).expand_as(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` (B,) turns, through HSV as torchvision does for tensors."""
    r, g, b = images.unbind(1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    sat = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta == 0, torch.zeros_like(hue), hue)
    hue = ((hue / 6.0) % 1.0 + shift.view(-1, 1, 1)) % 1.0
    value = maxc
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    i = i.long() % 6
    p = (value * (1 - sat)).clamp(0, 1)
    q = (value * (1 - sat * f)).clamp(0, 1)
    t = (value * (1 - sat * (1 - f))).clamp(0, 1)
    choices = [torch.stack(c, 1) for c in ((value, t, p), (q, value, p), (p, value, t),
                                          (p, q, value), (t, p, value), (value, p, q))]
    out = torch.zeros_like(images)
    for k, rgb in enumerate(choices):
        out = torch.where((i == k).unsqueeze(1), rgb, out)
    return out


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: torch.Tensor, generator: torch.Generator | None = None,
                 strength=JITTER) -> torch.Tensor:
    """ColorJitter on every image of the batch, each with its own factors and order of the four ops."""
    batch, device = images.shape[0], images.device
    factors = [_uniform((batch,), 1 - s, 1 + s, generator, device) for s in strength[:3]]
    factors.append(_uniform((batch,), -strength[3], strength[3], generator, device))
    order = torch.argsort(torch.rand(batch, 4, generator=generator, device=device), dim=1)  # a permutation each
    images = images.clone()
    for slot in range(4):
        for op_index, op in enumerate(COLOR_OPS):
            chosen = (order[:, slot] == op_index).nonzero().squeeze(1)  # images doing this op in this slot
            images[chosen] = op(images[chosen], factors[op_index][chosen])
    return images


def color_augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip (p 0.5), colour jitter (p 0.8), grayscale (p 0.2) of float images (B, 3, H, W) in [0, 1]."""
    batch, device = images.shape[0], images.device
    flip = torch.rand(batch, generator=generator, device=device) < P_FLIP
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    jitter = (torch.rand(batch, generator=generator, device=device) < P_JITTER).nonzero().squeeze(1)
    images = images.clone()
    images[jitter] = color_jitter(images[jitter], generator)
    gray = torch.rand(batch, generator=generator, device=device) < P_GRAY
    return torch.where(gray.view(-1, 1, 1, 1), grayscale(images).expand_as(images), images)


def _normalize(images: torch.Tensor, normalization) -> torch.Tensor:
    mean = torch.tensor(normalization[0], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(normalization[1], device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def model_layout(images: torch.Tensor) -> torch.Tensor:
    """The memory layout every encoder input takes: channels-last on CUDA (chosen on purpose: the models are
    channels-last there, cuDNN's fast layout), contiguous NCHW everywhere else.

    On the CPU a channels-last input makes oneDNN run the whole ResNet in NHWC, and its 1x1 stride-2
    convolution's backward-weights pass writes past its workspace when the input has fewer channels than the
    kernel's block (16 with AVX-512, 8 with AVX2; layer2's downsample at width 8): a crash, a hang or wrong
    weight gradients without any error (docs/ONEDNN_NHWC_CRASH.md). Contiguous NCHW takes other kernels.
    """
    layout = torch.channels_last if images.device.type == 'cuda' else torch.contiguous_format
    return images.contiguous(memory_format=layout)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1], in the encoders' layout (`model_layout`).

    The one place where image batches are made from the uint8 sets: the tensor augmentations and
    `datasets.normalize_batch` (every unaugmented pass) go through it; the PIL path's ToTensor + collate
    already gives contiguous NCHW. Later element-wise operations keep the layout.
    """
    return model_layout(images_uint8.permute(0, 3, 1, 2).float().div(255))  # (B, 3, H, W)


def simclr_views(images_uint8: torch.Tensor, normalization, generator: torch.Generator | None = None,
                 crop_scale=CROP_SCALE) -> torch.Tensor:
    """SimCLR augmentation of a uint8 batch (B, H, W, 3) -> normalised float (B, 3, H, W)."""
    images = to_float(images_uint8)
    batch, _, height, width = images.shape
    boxes = crop_boxes(batch, height, width, generator, images.device, scale=crop_scale)
    return _normalize(color_augment(resized_crop(images, boxes, height), generator), normalization)


def finetune_views(images_uint8: torch.Tensor, normalization, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """BadEncoder's reference augmentation (no crop) of a uint8 batch -> normalised float (B, 3, H, W)."""
    return _normalize(color_augment(to_float(images_uint8), generator), normalization)
