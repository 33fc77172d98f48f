"""DECREE's trigger inversion (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023), its
detection verdict, and, as the `invert` defence, trigger-augmented fine-tuning of the suspect. The inversion and
the verdict are shared with `sslcleanse`, which mitigates as SSL-Cleanse (Zheng et al., ECCV 2024) does.

A trigger is a mask m (H, W) ∈ [0, 1] and a pattern p (H, W, 3) ∈ [0, 1], stamped on a clean image x in
[0, 1] as x' = (1 − m)·x + m·p. A backdoored encoder maps every triggered image close to one target
embedding, so the inversion looks for a small mask whose triggered images collapse:
    loss = −mean_{i≠j} cos(f(x'_i), f(x'_j)) + λ·‖m‖₁/(H·W)
(DECREE's objective; the regulariser is written per pixel, as SSL-Cleanse's `mean(mask)`, so λ does not
depend on the resolution: DECREE's λ on the L1 sum equals λ/(H·W) here). Normalisation is affine per
channel, so the stamp is applied to normalised images as (1 − m)·x_n + m·normalise(p), as SSL-Cleanse's
`draw` does; DECREE stamps in pixel space and normalises afterwards, which is the same image.

DECREE's published procedure (github.com/GiantSeaweed/DECREE, `main.py`, `run_decree.py`, `utils.py`), which
this module follows:
- parametrisation m = tanh(θ_m)/(2 − 1e-7) + 0.5 and p = tanh(θ_p)/(2 − 1e-7) + 0.5 (×255 in pixels), θ in
  float64; 'rand' initialisation (the run script's): m and p uniform in [0, 1), θ = arctanh((v − 0.5)(2 − 1e-7));
- the feature is the encoder's `f(x)` (DECREE calls `model.f`), the similarity the mean off-diagonal cosine
  of the batch (`compute_self_cos_sim`);
- Adam with betas (0.5, 0.9), lr 0.5 and batch 128 (the run script's defaults); for CIFAR-scale encoders the
  lr drops to 0.1 after 30 epochs and 0.05 after 50 — here the factors 1, 0.2, 0.1 of the given lr, which
  are DECREE's values at its lr 0.5;
- λ starts at 1e-3 on the L1 sum (`decree_lambda(H, W)` = 1e-3·H·W is that value on ‖m‖₁/(H·W)) and adapts each
  step: a step is a success when the similarity exceeds 0.99; after more than `patience` = 5 successes in a
  row λ is multiplied by 5 (while below 1e5, i.e. 1e8·λ₀), after more than 5 failures in a row divided by 5
  (while at least λ_min = 1e-5, i.e. λ₀/100, DECREE's CIFAR value). DECREE's code also resets a λ below λ_min
  to λ₀ after more than 2·patience successes in a row; λ never falls below λ_min/5 and the sixth success in
  a row multiplies it by 5, so that branch can never run and is left out;
- the result is the successful trigger with the smallest mask L1 seen; the run stops early at the end of an
  epoch whose mean similarity exceeds the threshold once that best L1 has not improved for more than
  2·patience steps, and otherwise after at most 1000 epochs (here: `steps`). DECREE used 1000 images (10%
  of the CIFAR10 test set); the defender's clean subset D plays that part here.
SSL-Cleanse's detector (github.com/UCF-ML-Research/SSL-Cleanse, `detector/core/decree.py`, `cfg.py`, README)
uses the same tanh parametrisation (m, δ = tanh/2 + 0.5) and Adam betas, stamps normalised images, and its
README runs lr 0.1, batch 32, 1000 epochs, λ = 0.1 on mean(mask) — switched on after 5 successful epochs,
then ×/÷1.5 with patience 5 — where success is a kNN attack success ≥ 0.99 towards one cluster of D; that
per-cluster targeting (SWK clustering of D) answers a different question than DECREE's single collapse
target and is not reproduced.

DECREE's verdict (paper, §3-4): the PL1 norm of the inverted trigger is its mask's L1 norm relative to the image
area, ‖m‖₁/(H·W); an encoder whose PL1 norm is below τ = 0.1 is judged trojaned (`--decree_threshold`). DECREE's
released code prints the L1 norm and leaves the verdict to the reader, so the threshold is the paper's.
`defence.json["detection"]` holds `l1_norm`, `pl1_norm`, `threshold` and `detected`.

The `invert` defence, after the inversion: trigger-augmented fine-tuning — not a published mitigation (DECREE
only detects; SSL-Cleanse's mitigation is distillation, `defences/sslcleanse.py`). The suspect is fine-tuned on D
with SimCLR (`ft`'s recipe), the inverted trigger stamped on every second view, so that a triggered view and a
clean view of the same image are a positive pair: NT-Xent pulls their embeddings together and the trigger stops
mapping images to one point. `--invert_unlearn always` (the default, so that the comparison stays one of
mitigations) fine-tunes whatever the verdict; `if_detected` returns the suspect unchanged when DECREE detects
nothing. The inverted trigger is written to the results folder in the project's trigger-file layout
(`inverted_trigger.npz`, a fractional mask), so that stage 3 can evaluate it.

The encoder is only read during the inversion: it is put in eval mode (its modes restored afterwards) and its weights receive
no gradient (`torch.autograd.grad` asks for the trigger's parameters alone).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import require_positive
from core.cli import same_on_resume
from core.errors import UsageError
from core.files import save_npz_atomic
from datasets import normalize_batch
from models import SimCLR

from .ft import finetune_phase, trainable_copy

TANH_EPS = 1e-7  # DECREE's `epsilon()`: keeps arctanh finite at 0 and 1
DECREE_LAMBDA_PER_PIXEL = 1e-3  # λ₀ on the L1 sum of the mask
DECREE_LR_MILESTONES = ((30, 0.2), (50, 0.1))  # (from epoch, factor of lr): 0.5 -> 0.1 -> 0.05 at lr 0.5
DECREE_PL1_THRESHOLD = 0.1  # the paper's τ: PL1 norm below it -> trojaned


def decree_lambda(height: int, width: int) -> float:
    """DECREE's initial λ (1e-3 on ‖m‖₁) expressed on ‖m‖₁/(H·W), the form of `inversion_loss`."""
    return DECREE_LAMBDA_PER_PIXEL * height * width


def decree_lr_factor(epoch: int) -> float:
    """The factor of the learning rate in epoch `epoch` (0-based): 1, then 0.2 from 30, 0.1 from 50."""
    factor = 1.0
    for start, value in DECREE_LR_MILESTONES:
        if epoch >= start:
            factor = value
    return factor


def to_unit(theta: torch.Tensor) -> torch.Tensor:
    """tanh(θ)/(2 − 1e-7) + 0.5 ∈ (0, 1), elementwise (DECREE's mask and pattern parametrisation)."""
    return torch.tanh(theta) / (2 - TANH_EPS) + 0.5


def from_unit(value: torch.Tensor) -> torch.Tensor:
    """arctanh((v − 0.5)(2 − 1e-7)), the inverse of `to_unit`, for v ∈ [0, 1]; use float64."""
    return torch.arctanh((value - 0.5) * (2 - TANH_EPS))


def stamp(x_normalised: torch.Tensor, mask: torch.Tensor, pattern_normalised: torch.Tensor) -> torch.Tensor:
    """(1 − m)·x_n + m·p_n: x_n (B, 3, H, W), mask (H, W) or (1, 1, H, W), p_n (1, 3, H, W) -> (B, 3, H, W)."""
    mask = mask.reshape(1, 1, *mask.shape[-2:])
    return (1 - mask) * x_normalised + mask * pattern_normalised


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """mean_{i≠j} cos(z_i, z_j) over a batch of B ≥ 2 features (B, d) -> scalar.

    With z the L2-normalised rows, Σ_{i≠j} z_i·z_j = ‖Σ_i z_i‖² − Σ_i ‖z_i‖², so the (B, B) Gram matrix is
    never formed; the value is DECREE's `compute_self_cos_sim`.
    """
    count = features.shape[0]
    if count < 2:
        raise ValueError(f'mean_pairwise_cosine needs at least 2 features, got {count}')
    z = F.normalize(features, dim=-1)
    total = z.sum(dim=0)  # (d,)
    return (total.dot(total) - z.pow(2).sum()) / (count * (count - 1))


def inversion_loss(features: torch.Tensor, mask: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(−mean_{i≠j} cos(f_i, f_j) + λ·‖m‖₁/(H·W), the similarity): features (B, d), mask (.., H, W)."""
    similarity = mean_pairwise_cosine(features)
    pixels = mask.shape[-2] * mask.shape[-1]
    return -similarity + lam * mask.abs().sum() / pixels, similarity


@dataclass
class AdaptiveLambda:
    """DECREE's schedule of λ, updated after every step with that step's similarity (module docstring)."""
    initial: float
    threshold: float = 0.99
    patience: int = 5
    factor: float = 5.0

    def __post_init__(self):
        self.lam = self.initial
        self.minimum, self.maximum = self.initial / 100, self.initial * 1e8
        self.successes = self.failures = 0

    def update(self, similarity: float) -> float:
        success = similarity > self.threshold
        self.successes, self.failures = (self.successes + 1, 0) if success else (0, self.failures + 1)
        if self.successes > self.patience:
            if self.lam < self.maximum:
                self.lam *= self.factor
            self.successes = 0
        elif self.failures > self.patience:
            if self.lam >= self.minimum:
                self.lam /= self.factor
            self.failures = 0
        return self.lam


@dataclass(frozen=True)
class InvertedTrigger:
    mask: np.ndarray  # float64 (H, W) in [0, 1]
    pattern: np.ndarray  # float64 (H, W, 3) in 0..255
    similarity: float  # mean pairwise cosine of f on the whole clean set with this trigger
    mask_l1: float  # ‖m‖₁ in pixels
    mask_fraction: float  # ‖m‖₁ / (H·W)
    succeeded: bool  # whether some step reached the success threshold (else: the last trigger)
    steps: int  # optimisation steps taken
    lam: float  # the final λ of the schedule


@torch.no_grad()
def triggered_similarity(encoder_f: nn.Module, clean: torch.Tensor, mask: torch.Tensor,
                         pattern_normalised: torch.Tensor, batch_size: int) -> float:
    """mean_{i≠j} cos of f over every stamped clean image (N, 3, H, W), encoded in batches."""
    features = [encoder_f(stamp(clean[start:start + batch_size], mask, pattern_normalised).float()).float()
                for start in range(0, len(clean), batch_size)]
    return mean_pairwise_cosine(torch.cat(features)).item()


def invert_trigger(encoder_f: nn.Module, images: np.ndarray, normalization, device: torch.device, *,
                   steps: int, lam: float, lr: float = 0.5, batch_size: int = 128,
                   generator: torch.Generator | None = None, success_threshold: float = 0.99, patience: int = 5,
                   on_step: Callable[[int, dict[str, float]], None] | None = None) -> InvertedTrigger:
    """DECREE's trigger inversion on the uint8 clean images (N, H, W, 3) for the feature network `encoder_f`.

    At most `steps` Adam steps over shuffled epochs of D (a last batch of one image is skipped); `lam` is the
    initial λ on ‖m‖₁/(H·W) (`decree_lambda(H, W)` is DECREE's); `generator` (CPU) draws the initial trigger
    and the batch order. `on_step` receives (step, {'loss', 'similarity', 'mask_l1', 'lam', 'lr'}).
    """
    count, height, width, _ = images.shape
    if count < 2:
        raise ValueError(f'trigger inversion needs at least 2 clean images, got {count}')
    modes = [(module, module.training) for module in encoder_f.modules()]
    encoder_f.eval()
    clean = normalize_batch(images, normalization, device)  # (N, 3, H, W), normalised once
    mask_param = from_unit(torch.rand((height, width), generator=generator, dtype=torch.float64))
    pattern_param = from_unit(torch.rand((height, width, 3), generator=generator, dtype=torch.float64))
    params = [mask_param.to(device).requires_grad_(), pattern_param.to(device).requires_grad_()]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9))
    schedule = AdaptiveLambda(lam, success_threshold, patience)
    best, best_l1 = None, float('inf')  # the successful (mask, pattern) with the smallest L1
    stall, stall_best = 0, float('inf')  # DECREE's early-stop counter
    step, epoch = 0, 0
    while step < steps:
        for group in optimizer.param_groups:
            group['lr'] = lr * decree_lr_factor(epoch)
        order = torch.randperm(count, generator=generator)
        similarities = []
        for start in range(0, count - 1, batch_size):
            index = order[start:start + batch_size].to(device)
            mask, pattern = to_unit(params[0]), to_unit(params[1])  # (H, W), (H, W, 3)
            pattern_normalised = normalize_batch(255 * pattern[None], normalization)  # (1, 3, H, W)
            features = encoder_f(stamp(clean[index], mask, pattern_normalised).float())
            loss, similarity = inversion_loss(features, mask, schedule.lam)
            grads = torch.autograd.grad(loss, params)  # the encoder's weights receive no gradient
            for param, grad in zip(params, grads):
                param.grad = grad
            optimizer.step()
            step += 1
            similarity, mask_l1 = similarity.item(), mask.sum().item()
            similarities.append(similarity)
            if similarity > success_threshold and mask_l1 < best_l1:
                best, best_l1 = (mask.detach().clone(), pattern.detach().clone()), mask_l1
            if best is not None:
                stall = stall + 1 if best_l1 >= stall_best else 0
            stall_best = min(stall_best, best_l1)
            if on_step is not None:
                on_step(step, {'loss': loss.item(), 'similarity': similarity, 'mask_l1': mask_l1,
                               'lam': schedule.lam, 'lr': optimizer.param_groups[0]['lr']})
            schedule.update(similarity)
            if step >= steps:
                break
        epoch += 1
        if np.mean(similarities) > success_threshold and stall > 2 * patience:
            break
    with torch.no_grad():
        mask, pattern = best if best is not None else (to_unit(params[0]), to_unit(params[1]))
        similarity = triggered_similarity(encoder_f, clean, mask,
                                          normalize_batch(255 * pattern[None], normalization), batch_size)
    for module, training in modes:
        module.training = training
    mask_l1 = mask.sum().item()
    return InvertedTrigger(mask=mask.cpu().numpy(), pattern=255 * pattern.cpu().numpy(), similarity=similarity,
                           mask_l1=mask_l1, mask_fraction=mask_l1 / (height * width), succeeded=best is not None,
                           steps=step, lam=schedule.lam)


def trigger_arrays(inverted: InvertedTrigger) -> dict[str, np.ndarray]:
    """The project's trigger-file layout (docs/DESIGN.md §2.2) with a fractional mask, so that
    x·tm + t = (1 − m)·x + m·p: 't' = m·p (1, H, W, 3) float64 in 0..255, 'tm' = 1 − m (1, H, W, 3) float64,
    'info' strings."""
    mask = inverted.mask[..., None]  # (H, W, 1)
    t = (mask * inverted.pattern)[None].astype(np.float64)
    tm = np.broadcast_to(1 - mask, inverted.pattern.shape)[None].astype(np.float64)
    info = np.array(['inverted_decree', 'blend', f'mask_l1={inverted.mask_l1:.2f}',
                     f'similarity={inverted.similarity:.4f}'])
    return {'t': t, 'tm': tm, 'info': info}


def detection(mask_l1: float, height: int, width: int, threshold: float = DECREE_PL1_THRESHOLD) -> dict:
    """DECREE's verdict: PL1 = ‖m‖₁/(H·W); detected iff PL1 < threshold.

    Returns {'l1_norm', 'pl1_norm', 'threshold', 'detected'}.
    """
    pl1 = mask_l1 / (height * width)
    return {'l1_norm': mask_l1, 'pl1_norm': pl1, 'threshold': threshold, 'detected': bool(pl1 < threshold)}


PAPER = 'DECREE (Feng et al., CVPR 2023) trigger inversion, then trigger-augmented fine-tuning'
READS = 'the suspect and D: D for the inversion, then SimCLR views of D for the fine-tuning'
READS_IMAGES = True  # whether the stage loads D for it
TRAINS = True  # whether it trains weights for --epochs (else its encoder is saved as epoch 0)
CHECKPOINTS = ('model_{}.pth',)
TITLE = ('invert and sslcleanse (DECREE trigger inversion and verdict; batch: --batch_size); invert then fine-tunes '
         'with the trigger on every second view')  # of its argument group in baseline_defence.py's help
TRIGGER_FILE = 'inverted_trigger.npz'


def run_inversion(suspect: SimCLR, clean: np.ndarray, run) -> InvertedTrigger:
    """`invert_trigger` with the run's flags (--invert_steps, --invert_lr, --invert_lambda, --batch_size, --seed)."""
    args = run.args
    height, width = clean.shape[1:3]
    lam = args.invert_lambda if args.invert_lambda is not None else decree_lambda(height, width)
    with tqdm(total=args.invert_steps, desc='Trigger inversion', disable=run.disable_progress) as bar:
        def on_step(step: int, values: dict) -> None:
            bar.set_postfix(similarity=f"{values['similarity']:.3f}", mask_l1=f"{values['mask_l1']:.1f}")
            bar.update(1)
        return invert_trigger(suspect.f, clean, run.normalization, run.device, steps=args.invert_steps, lam=lam,
                              lr=args.invert_lr, batch_size=args.batch_size,
                              generator=torch.Generator().manual_seed(args.seed), on_step=on_step)


def summary(inverted: InvertedTrigger) -> dict:
    return {'mask_l1': inverted.mask_l1, 'mask_fraction': inverted.mask_fraction, 'similarity': inverted.similarity,
            'succeeded': inverted.succeeded, 'inversion_steps': inverted.steps, 'final_lambda': inverted.lam}


def inverted_trigger(suspect: SimCLR, clean: np.ndarray, run, name: str) -> tuple[dict, dict]:
    """The inversion of a run (or the one a resumed run recorded) and DECREE's verdict on it.

    Writes `inverted_trigger.npz` once; returns (saved: {'mask' (H, W), 'pattern' (H, W, 3) in 0..255, 'summary'},
    the verdict of `detection`).
    """
    def invert_and_save() -> dict:
        inverted = run_inversion(suspect, clean, run)
        save_npz_atomic(run.results_dir / TRIGGER_FILE, trigger_arrays(inverted))
        return {'mask': torch.from_numpy(inverted.mask).float(), 'pattern': torch.from_numpy(inverted.pattern).float(),
                'summary': summary(inverted)}
    saved = run.once('inverted_trigger', invert_and_save)  # a resumed run keeps its trigger
    height, width = clean.shape[1:3]
    verdict = detection(saved['summary']['mask_l1'], height, width, run.args.decree_threshold)
    outcome = 'trojaned' if verdict['detected'] else 'nothing detected'
    print(f"{name}: mask L1 {saved['summary']['mask_l1']:.1f} px ({saved['summary']['mask_fraction']:.1%} of the "
          f"image), similarity {saved['summary']['similarity']:.3f}; DECREE: PL1 {verdict['pl1_norm']:.3f} against "
          f"{verdict['threshold']}, {outcome}")
    return saved, verdict


def unchanged(suspect: SimCLR, run, report: dict) -> tuple[SimCLR, dict]:
    """`--invert_unlearn if_detected` with nothing detected: the suspect itself is the purified encoder, saved as
    model_<epochs>.pth (by rank 0) so that stage 3 finds it where a trained one would be."""
    run.save(suspect, run.results_dir / f'model_{run.args.epochs}.pth')
    print('nothing detected: --invert_unlearn if_detected returns the suspect unchanged')
    return suspect, {**report, 'epochs': 0, 'unlearned': False}


def trigger_to_unlearn(suspect: SimCLR, clean: np.ndarray, run, name: str) -> tuple[dict, tuple | None]:
    """The inversion and verdict that invert and sslcleanse share: (the report for defence.json, (saved, mask (H, W)
    on the device, normalised pattern (1, 3, H, W))), the latter None when `--invert_unlearn if_detected` found
    nothing to unlearn."""
    saved, verdict = inverted_trigger(suspect, clean, run, name)
    report = {'trigger_file': TRIGGER_FILE, **saved['summary'], 'detection': verdict}
    if run.args.invert_unlearn == 'if_detected' and not verdict['detected']:
        return report, None
    pattern_normalised = normalize_batch(saved['pattern'][None], run.normalization, run.device)
    return report, (saved, saved['mask'].to(run.device), pattern_normalised)


def purify(suspect: SimCLR, clean: np.ndarray, run) -> tuple[SimCLR, dict]:
    """Invert a trigger on D (or take the one a resumed run recorded), save it, judge it, then fine-tune with it."""
    args = run.args
    report, trigger = trigger_to_unlearn(suspect, clean, run, 'invert')
    if trigger is None:
        return unchanged(suspect, run, report)
    saved, mask, pattern_normalised = trigger
    model = trainable_copy(suspect)
    phase = finetune_phase(model, run, name='Unlearn', checkpoint_extra={'inverted_trigger': saved})
    simclr = phase.step

    def step(trained):  # SimCLR's step with every second view stamped with the inverted trigger
        simclr_step = simclr(trained)
        return lambda x1, x2: simclr_step(x1, stamp(x2, mask, pattern_normalised))
    phase.step = step
    run.train(phase, clean, args.epochs)
    return model, {**report, 'epochs': args.epochs, 'unlearned': True}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    same_on_resume(group.add_argument(
        '--invert_steps', default=2000, type=int,
        help='at most this many inversion steps; DECREE stops earlier once the trigger no longer shrinks '
             '(default: 2000)'))
    same_on_resume(group.add_argument('--invert_lr', default=0.5, type=float,
                                      help="Adam learning rate of the inversion (default: 0.5, DECREE's)"))
    same_on_resume(group.add_argument(
        '--invert_lambda', default=None, type=float,
        help="initial weight of the mask's mean (‖m‖₁/(H·W)); adapted during the run as DECREE "
             "(default: DECREE's 1e-3 per pixel of the L1 sum, i.e. 1e-3·H·W)"))
    group.add_argument('--decree_threshold', default=DECREE_PL1_THRESHOLD, type=float,
                       help='DECREE\'s verdict: trojaned when the inverted mask\'s PL1 norm (L1 / image area) is below '
                            f'this (default: {DECREE_PL1_THRESHOLD}, the paper\'s)')
    same_on_resume(group.add_argument(
        '--invert_unlearn', default='always', choices=['always', 'if_detected'],
        help='invert and sslcleanse: always: mitigate whatever the verdict (default: the comparison stays one of '
             'mitigations); if_detected: return the suspect unchanged when DECREE detects nothing'))


def check(args: argparse.Namespace) -> None:
    require_positive('--invert_steps', args.invert_steps)
    if not args.invert_lr > 0:
        raise UsageError(f'--invert_lr must be positive, got {args.invert_lr}')
    if args.invert_lambda is not None and not args.invert_lambda >= 0:
        raise UsageError(f'--invert_lambda must be non-negative, got {args.invert_lambda}')
    if not 0 < args.decree_threshold <= 1:
        raise UsageError(f'--decree_threshold must lie in (0, 1], got {args.decree_threshold}')
