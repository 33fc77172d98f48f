"""DRUPE (Tao et al., "Distribution Preserving Backdoor Attack in Self-supervised Learning", IEEE S&P 2024).

DRUPE is BadEncoder (docs/DESIGN.md §5) with R ≥ 2 references of the target class and four more terms, so that the
triggered embeddings are neither far from the clean ones (a distribution shift) nor packed into one point (a
concentration): the two statistics that embedding-based detectors (DECREE) and mitigations rely on.
With f the encoder being trained (raw, unnormalised features), x a shadow image, x ⊕ t its triggered copy,
r_1..r_R the references, b over the batch and S[i, b] = cos(f(x_b ⊕ t), f(r_i)), shape (R, B):

    L0     = −mean_b max_i S[i, b]                        each triggered input joins its nearest reference
    L1, L2                                                BadEncoder's: references and clean inputs keep f0's features
    σ_ref  = std_i mean_b S[i, b]                          the references share the triggered inputs evenly
    s_trig = mean_{b≠b'} cos(f(x_b ⊕ t), f(x_b' ⊕ t))      concentration of the triggered embeddings
    s_ref  = mean_{i≤j} cos(f(r_i), f(r_j))                the references' own similarity (i = j included, as the code)
    D      = SW_2(f(x ⊕ t), f(x)) / mean_k std_b f(x_b)_k  sliced Wasserstein distance over the clean features' spread

Training runs in three phases (epochs counted from 1; `Schedule` holds every constant):

    warm-up  (epoch 1):       λ1 L1 + λ2 L2 + 0.5 s_ref  (0.3 s_ref while s_ref < 0.2)        no L0 yet
    attack   (epochs 2..4):   L0 + λ1 L1 + λ2 L2 + 2 σ_ref + w(s_ref) s_ref
    preserve (epochs ≥ 5):    L0 + λ1 L1 + λ2 L2 + c (σ_ref + s_trig) + c_D D + (0.5 + 1.5·[σ_ref > 0.1]) σ_ref
                              + w(s_ref) s_ref

with w(s) = 1 for s > 0.5, 0.2 for s > 0.4, else 0 (a batch's own values decide). The costs c (initially 0.1)
and c_D (0.001) adapt after every epoch > 20, as Neural Cleanse adapts its cost (patience 1): an epoch *meets
the targets* when its mean L0 < −0.96 and L1, L2 < −0.9; then c ×= 1.25, else c /= 1.25^1.25. c_D does the
same on "meets the targets and s_trig < 0.6"; when s_trig < 0.5 too, the next raise of c is skipped. The
attack's output (DRUPE's best.pth) is, among the epochs > 24 that met c_D's criterion, the one with the
smallest SW_2 (not divided by the spread).

Recipe (`RECIPE`; the README's command over main.py's defaults): SGD with momentum 0.9 and weight decay 5e-4 on
f only (BatchNorm frozen, as BadEncoder), lr 0.05, batch 256, 120 epochs, λ1 = λ2 = 1, 3 references (the
README's reference/gtsrb_l12_n3.npz; main.py's --n_ref 3), a shadow set of 20% of the pre-training split
(--shadow_fraction 0.2: 10000 images), one trigger for every reference, SW_2 over 50 random projections per
step (POT's default).

Sources read: github.com/Gwinhen/DRUPE at e16077d: README.md (the command), main.py (train(): the terms and
phases, lines 145–228; the cost updates, lines 262–318; __main__: the initial costs and multipliers, lines
465–483; the checkpoint choice, lines 532–536), datasets/cifar10_dataset.py and stl10_dataset.py (the shadow
fraction), datasets/backdoor_dataset.py (patch 0 for every reference), requirements.txt (POT 0.8). The paper's
text could not be read here (no copy among the reachable sources, and the repository's "Supplementary
Material.pdf" is absent from its snapshot): the recipe is the published code's, and no statement here says what
the paper writes.

Where this implementation departs from the code, and why:
- D is `sliced_wasserstein` below, in torch, with no new dependency. The code calls POT's
  ot.sliced_wasserstein_distance: the same estimator (directions uniform on the sphere, p = 2, equal weights),
  but drawing its directions from torch's global RNG; here they come from an explicit generator seeded by
  (seed, epoch), so a resumed run draws the same ones.
- The cost updates and the checkpoint choice read epoch means of every statistic. The code reads epoch means
  of L0..L2 but the last batch's s_trig and SW_2.
- Only an epoch that met the criterion is a candidate output. In the code the stored measure starts at 0 and
  keeps its last value: unless one of epochs 21..24 met the criterion, epoch 25 becomes best.pth with measure 0,
  and no later epoch can replace it.
- s_trig is the exact mean over the pairs b ≠ b'. The code's `(S − diag_embed(S)).mean()` broadcasts to
  (B, B, B) and equals (1 − 1/B)·(mean over all pairs, b = b' included), within 2/B of it.
- Several trigger patches (one per reference; the code always applies patch 0): S[i, b] uses copy i, and
  s_trig and D are averaged over the copies.
- Not reproduced: the k-means "cluster-based distance" printed on every epoch's first batch, a clean-feature
  spread computed in epoch 1 and never used, a downstream probe every 10 epochs (stage 3 does that), and the
  ImageNet/CLIP constants (those for CIFAR10/STL10 are used). The code's "cost = init_cost when cost == 0" rule
  cannot fire (costs are only multiplied and divided) and is left out.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.cli import require_positive
from common.runs import save_run_checkpoint
from core import processes
from core.cli import SameOnResume
from core.errors import UsageError

from .badencoder import LOG_COLUMNS as BADENCODER_COLUMNS
from .badencoder import BadEncoder, StepFeatures, utility_terms

# DRUPE's values of train_badencoder.py flags (the README's command: --lr 0.05 --epochs 120 --batch_size 256
# with reference/gtsrb_l12_n3.npz; main.py: --shadow_fraction 0.2).
RECIPE = {'lr': 0.05, 'epochs': 120, 'batch_size': 256, 'shadow_fraction': 0.2, 'num_references': 3}
SWD_PROJECTIONS = 50  # POT's default for ot.sliced_wasserstein_distance, which DRUPE calls without the argument
# The terms DRUPE adds to BadEncoder's loss0..loss2, in the order they are logged.
TERMS = ('spread_std', 'trigger_sim', 'reference_sim', 'swd', 'swd_rel')
PHASES = ('warmup', 'attack', 'preserve')


# ------------------------------------------------------------------------------------------------ terms

def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int, generator: torch.Generator,
                       p: float = 2.0) -> torch.Tensor:
    """Sliced p-Wasserstein distance between the empirical distributions of x and y, both (N, d).

        SW_p(x, y) = ( (1/P) Σ_k W_p^p(x·θ_k, y·θ_k) )^(1/p),   θ_k ~ uniform on the unit sphere of R^d,

    where, for two sets of N numbers with equal weights, W_p^p(a, b) = (1/N) Σ_n |a_(n) − b_(n)|^p over the
    sorted values. The P = `num_projections` directions are drawn from `generator`, which lives on x's device.
    Differentiable in x and y (through the sort).
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f'sliced_wasserstein: expected two (N, d) sets of one shape, got {tuple(x.shape)} '
                         f'and {tuple(y.shape)}')
    directions = torch.randn(x.shape[1], num_projections, generator=generator, device=x.device, dtype=x.dtype)
    directions = directions / torch.linalg.vector_norm(directions, dim=0, keepdim=True)  # (d, P)
    x_sorted = (x @ directions).sort(dim=0).values  # (N, P)
    y_sorted = (y @ directions).sort(dim=0).values  # (N, P)
    return (x_sorted - y_sorted).abs().pow(p).mean(dim=0).mean().pow(1.0 / p)


def reference_similarities(triggered: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """S[i, b] = cos(triggered[c(i), b], reference[i]): (C, B, d) and (R, d) -> (R, B).

    C is 1 (every reference shares the triggered copy, c(i) = 0) or R (copy i carries trigger i).
    """
    return (F.normalize(triggered, dim=-1) * F.normalize(reference, dim=-1)[:, None, :]).sum(dim=-1)


def nearest_reference_loss(similarities: torch.Tensor) -> torch.Tensor:
    """DRUPE's effectiveness term L0 = −mean_b max_i S[i, b], for S (R, B)."""
    return -similarities.max(dim=0).values.mean()


def reference_balance(similarities: torch.Tensor) -> torch.Tensor:
    """σ_ref = std_i (mean_b S[i, b]) (unbiased, over the R ≥ 2 references), for S (R, B)."""
    return similarities.mean(dim=1).std()


def pairwise_similarity(features: torch.Tensor) -> torch.Tensor:
    """s_trig = mean over the leading dims of mean_{b≠b'} cos(x_b, x_b'), for (..., B, d) with B ≥ 2.

    With z_b = x_b/‖x_b‖: Σ_{b≠b'} z_b·z_b' = ‖Σ_b z_b‖² − Σ_b ‖z_b‖², divided by B(B − 1); O(B·d).
    """
    z = F.normalize(features, dim=-1)
    batch = z.shape[-2]
    off_diagonal = z.sum(dim=-2).pow(2).sum(dim=-1) - z.pow(2).sum(dim=(-2, -1))  # (...,)
    return (off_diagonal / (batch * (batch - 1))).mean()


def reference_similarity(reference: torch.Tensor) -> torch.Tensor:
    """s_ref = mean_{i≤j} cos(r_i, r_j) over the R(R+1)/2 pairs, i = j included (as DRUPE's code), for (R, d).

    With z_i = r_i/‖r_i‖: Σ_{i≤j} z_i·z_j = (‖Σ_i z_i‖² + Σ_i ‖z_i‖²)/2, so s_ref = (‖Σ z‖² + Σ‖z‖²) / (R(R+1)).
    """
    z = F.normalize(reference, dim=-1)
    count = len(z)
    return (z.sum(dim=0).pow(2).sum() + z.pow(2).sum()) / (count * (count + 1))


def feature_spread(features: torch.Tensor) -> torch.Tensor:
    """mean_k std_b x[b, k] (unbiased) for (B, d): the scale D is measured in."""
    return features.std(dim=0).mean()


def drupe_terms(clean: torch.Tensor, triggered: torch.Tensor, reference: torch.Tensor,
                generator: torch.Generator, num_projections: int) -> dict[str, torch.Tensor]:
    """One step's DRUPE terms from f's raw features: clean (B, d) f(x), triggered (C, B, d) f(x ⊕ t_c),
    reference (R, d) f(r_i).

    Returns loss0 (L0), spread_std (σ_ref), trigger_sim (s_trig), reference_sim (s_ref), swd (mean_c SW_2 of
    copy c against the clean features) and swd_rel (D = swd / feature_spread(clean)); see the module docstring.
    """
    similarities = reference_similarities(triggered, reference)  # (R, B)
    swd = torch.stack([sliced_wasserstein(copy, clean, num_projections, generator) for copy in triggered]).mean()
    return {'loss0': nearest_reference_loss(similarities),
            'spread_std': reference_balance(similarities),
            'trigger_sim': pairwise_similarity(triggered),
            'reference_sim': reference_similarity(reference),
            'swd': swd,
            'swd_rel': swd / feature_spread(clean)}


# --------------------------------------------------------------------------------------------- schedule

@dataclass(frozen=True)
class Schedule:
    """DRUPE's phases, coefficients and adaptive-cost rules (main.py; CIFAR10/STL10 values)."""
    warmup_epochs: int = 1  # epochs 1..warmup_epochs: no L0 (main.py: warm_up = epoch < 2)
    preserve_from: int = 5  # first epoch with c, c_D and D (main.py: stage_1_epoch = 5)
    adapt_after: int = 20  # the costs adapt after every epoch > this (main.py: fix_epoch = 20)
    select_after: int = 24  # candidate outputs are the epochs > this (main.py: epoch > 24)
    cost_spread: float = 0.1  # initial c (init_cost)
    cost_dist: float = 0.001  # initial c_D (init_cost_1)
    cost_up: float = 1.25  # cost_multiplier_up
    cost_down: float = 1.25 ** 1.25  # cost_multiplier_down
    patience: int = 1
    effect_target: float = -0.96  # an epoch meets the targets when mean L0 < this (l0_threshold) ...
    utility_target: float = -0.9  # ... and mean L1, L2 < this
    trigger_sim_target: float = 0.6  # c_D rises when s_trig < this too (b2b_sim_threshold) ...
    trigger_sim_spread: float = 0.5  # ... and the next raise of c is skipped when s_trig < this
    warmup_reference_weight: float = 0.5
    warmup_reference_floor: float = 0.2  # below it the warm-up weight of s_ref drops by ...
    warmup_reference_relief: float = 0.2  # ... this
    attack_spread_weight: float = 2.0  # σ_ref's weight in the attack phase
    preserve_spread_weight: float = 0.5  # σ_ref's weight in the preserve phase, besides c ...
    spread_excess: float = 0.1  # ... plus this extra weight when σ_ref exceeds
    spread_excess_weight: float = 1.5  # this threshold
    reference_sim_steps: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.4, 0.2))  # s_ref > s: weight w


def phase_of(epoch: int, schedule: Schedule) -> str:
    """'warmup' for epochs ≤ warmup_epochs, then 'attack' until preserve_from, then 'preserve'."""
    if epoch <= schedule.warmup_epochs:
        return 'warmup'
    return 'attack' if epoch < schedule.preserve_from else 'preserve'


def reference_sim_weight(phase: str, reference_sim: float, schedule: Schedule) -> float:
    """s_ref's weight: 0.5 in the warm-up (0.3 below 0.2), else w(s_ref) = 1 above 0.5, 0.2 above 0.4, else 0."""
    if phase == 'warmup':
        relief = schedule.warmup_reference_relief if reference_sim < schedule.warmup_reference_floor else 0.0
        return schedule.warmup_reference_weight - relief
    return next((weight for threshold, weight in schedule.reference_sim_steps if reference_sim > threshold), 0.0)


def term_weights(phase: str, cost_spread: float, cost_dist: float, spread_std: float, reference_sim: float,
                 lambda1: float, lambda2: float, schedule: Schedule) -> dict[str, float]:
    """The weight of every term in one step's loss (module docstring's table); σ_ref and s_ref are the step's."""
    weights = {'loss0': 0.0 if phase == 'warmup' else 1.0, 'loss1': lambda1, 'loss2': lambda2,
               'spread_std': 0.0, 'trigger_sim': 0.0, 'swd_rel': 0.0,
               'reference_sim': reference_sim_weight(phase, reference_sim, schedule)}
    if phase == 'attack':
        weights['spread_std'] = schedule.attack_spread_weight
    elif phase == 'preserve':
        excess = schedule.spread_excess_weight if spread_std > schedule.spread_excess else 0.0
        weights.update(spread_std=cost_spread + schedule.preserve_spread_weight + excess,
                       trigger_sim=cost_spread, swd_rel=cost_dist)
    return weights


def weighted_loss(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """L = Σ_k weights[k] · terms[k] over the weighted terms."""
    return sum(weight * terms[name] for name, weight in weights.items())


@dataclass(frozen=True)
class DrupeState:
    """What DRUPE carries from epoch to epoch: the costs, their counters and the best candidate so far."""
    cost_spread: float
    cost_dist: float
    up: int = 0
    down: int = 0
    up_dist: int = 0
    down_dist: int = 0
    best_swd: float = math.inf
    best_epoch: int = 0  # 0: no candidate yet


def initial_state(schedule: Schedule) -> DrupeState:
    return DrupeState(schedule.cost_spread, schedule.cost_dist)


def meets_targets(means: dict[str, float], schedule: Schedule) -> bool:
    """An epoch meets the targets when mean L0 < −0.96 and mean L1, L2 < −0.9."""
    return (means['loss0'] < schedule.effect_target and means['loss1'] < schedule.utility_target
            and means['loss2'] < schedule.utility_target)


def _adapt(cost: float, up: int, down: int, passed: bool, schedule: Schedule) -> tuple[float, int, int]:
    """Neural Cleanse's rule: after `patience` passing epochs in a row cost ×= cost_up, after `patience`
    failing ones cost /= cost_down; the counter that fires restarts at 0."""
    up, down = (up + 1, 0) if passed else (0, down + 1)
    if up >= schedule.patience:
        return cost * schedule.cost_up, 0, down
    if down >= schedule.patience:
        return cost / schedule.cost_down, up, 0
    return cost, up, down


def end_of_epoch(state: DrupeState, epoch: int, means: dict[str, float], schedule: Schedule) -> DrupeState:
    """The state after `epoch`, given its mean loss0, loss1, loss2, trigger_sim and swd (`means`).

    After every epoch > adapt_after (outside the warm-up) c adapts on `meets_targets` and c_D on "meets the
    targets and s_trig < 0.6"; when s_trig < 0.5 as well, c's counter is decremented, so that its next raise
    is skipped. An epoch > select_after that passed c_D's test with a smaller SW_2 becomes the best.
    """
    if epoch <= schedule.adapt_after or phase_of(epoch, schedule) == 'warmup':
        return state
    on_target = meets_targets(means, schedule)
    spread_out = on_target and means['trigger_sim'] < schedule.trigger_sim_target
    cost_spread, up, down = _adapt(state.cost_spread, state.up, state.down, on_target, schedule)
    cost_dist, up_dist, down_dist = _adapt(state.cost_dist, state.up_dist, state.down_dist, spread_out, schedule)
    if spread_out and means['trigger_sim'] < schedule.trigger_sim_spread:
        up -= 1
    state = replace(state, cost_spread=cost_spread, cost_dist=cost_dist, up=up, down=down, up_dist=up_dist,
                    down_dist=down_dist)
    if spread_out and epoch > schedule.select_after and means['swd'] < state.best_swd:
        state = replace(state, best_swd=means['swd'], best_epoch=epoch)
    return state


# ------------------------------------------------------------------------------------ flags of train_badencoder.py

TITLE = 'DRUPE (--attack drupe only; terms and phases in attacks/drupe.py)'  # of its argument group
# --drupe_<name> sets field <name> of Schedule; two more flags choose the SWD's directions and the output.
SCHEDULE_FLAGS = ('warmup_epochs', 'preserve_from', 'adapt_after', 'select_after', 'cost_spread', 'cost_dist')
FLAGS = tuple(f'drupe_{name}' for name in SCHEDULE_FLAGS) + ('drupe_projections', 'drupe_output')


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """DRUPE's own flags; None (not applicable) under --attack badencoder, DRUPE's values (`defaults`) under drupe.
    All but --drupe_output, which only chooses among the epochs at the end, shape the run (`same_on_resume`)."""
    schedule = Schedule()
    same = SameOnResume(group)
    same.add_argument('--drupe_warmup_epochs', default=None, type=int,
                      help=f'first epochs without the effectiveness term L0 (DRUPE: {schedule.warmup_epochs})')
    same.add_argument('--drupe_preserve_from', default=None, type=int,
                      help='first epoch with the distribution (SWD) and spread costs '
                           f'(DRUPE: {schedule.preserve_from})')
    same.add_argument('--drupe_adapt_after', default=None, type=int,
                      help=f'the costs adapt after every later epoch (DRUPE: {schedule.adapt_after})')
    same.add_argument('--drupe_select_after', default=None, type=int,
                      help=f'the output is chosen among the later epochs (DRUPE: {schedule.select_after})')
    same.add_argument('--drupe_cost_spread', default=None, type=float,
                      help='initial cost c of the spread terms σ_ref + s_trig (DRUPE: '
                           f'{schedule.cost_spread})')
    same.add_argument('--drupe_cost_dist', default=None, type=float,
                      help=f'initial cost c_D of the distribution term D (DRUPE: {schedule.cost_dist})')
    same.add_argument('--drupe_projections', default=None, type=int,
                      help='random directions of the sliced Wasserstein distance per step '
                           f"(DRUPE: {SWD_PROJECTIONS}, POT's default)")
    group.add_argument('--drupe_output', default=None, choices=('best', 'last'),
                       help="the encoder model_<epochs>.pth holds: DRUPE's selected epoch (best.pth) or the "
                            'last one (DRUPE: best)')


def defaults() -> dict:
    """DRUPE's values of the flags a `--attack drupe` command line leaves out (its recipe and its flags)."""
    schedule = Schedule()
    return {**RECIPE, **{f'drupe_{name}': getattr(schedule, name) for name in SCHEDULE_FLAGS},
            'drupe_projections': SWD_PROJECTIONS, 'drupe_output': 'best'}


def schedule_from_args(args: argparse.Namespace) -> Schedule:
    return Schedule(**{name: getattr(args, f'drupe_{name}') for name in SCHEDULE_FLAGS})


def check(args: argparse.Namespace) -> None:
    """Under --attack badencoder no DRUPE flag may be given; under drupe its values must work."""
    if args.attack != 'drupe':
        given = [flag for flag in FLAGS if getattr(args, flag) is not None]
        if given:
            raise UsageError(f'--{given[0]} applies to --attack drupe only')
        return
    if args.num_references < 2:
        raise UsageError(f'--num_references {args.num_references}: DRUPE needs at least 2 references '
                         '(it balances the triggered inputs among them)')
    if args.batch_size < 2:
        raise UsageError('--batch_size: DRUPE needs at least 2 images per batch (it measures their spread)')
    require_positive('--drupe_projections', args.drupe_projections)
    for flag in ('drupe_warmup_epochs', 'drupe_cost_spread', 'drupe_cost_dist'):
        if getattr(args, flag) < 0:
            raise UsageError(f'--{flag} must not be negative, got {getattr(args, flag)}')


# ------------------------------------------------------------------------------ the attack in train_badencoder.py

BEST_CHECKPOINT = 'best.pth'  # DRUPE's selected epoch, under the name its code gives it
LOG_COLUMNS = BADENCODER_COLUMNS[:5] + TERMS + ('cost_spread', 'cost_dist') + BADENCODER_COLUMNS[5:]
SWD_STREAM = 0x5D  # tells the SWD directions' seed sequence apart from any other drawn from (seed, epoch)


def drupe_objective(features: StepFeatures, lambda1: float, lambda2: float, phase: str, state: DrupeState,
                    schedule: Schedule, generator: torch.Generator, num_projections: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(DRUPE's loss in `phase` with the epoch's costs, the terms): the table of this module's docstring."""
    terms = {**drupe_terms(features.clean, features.triggered, features.reference, generator, num_projections),
             **utility_terms(features)}
    weights = term_weights(phase, state.cost_spread, state.cost_dist, terms['spread_std'].item(),
                           terms['reference_sim'].item(), lambda1, lambda2, schedule)
    return weighted_loss(terms, weights), terms


def projection_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's SWD directions: a function of (seed, epoch) alone, so a resumed run draws the
    same directions, and a stream of its own, apart from the data order's (seed·100003 + epoch)."""
    state = np.random.SeedSequence((seed % 2 ** 32, epoch, SWD_STREAM)).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))


class Drupe(BadEncoder):
    """DRUPE through BadEncoder's interface. What it carries from epoch to epoch besides the model and the
    optimiser: its schedule, its costs and best candidate (`DrupeState`), and that candidate's weights (on the
    CPU)."""
    columns = LOG_COLUMNS

    def __init__(self, args: argparse.Namespace, device: torch.device):
        super().__init__(args, device)
        self.schedule = schedule_from_args(args)
        self.state = initial_state(self.schedule)
        self.best_weights: dict | None = None

    @staticmethod
    def flag_defaults() -> dict:
        return defaults()

    def copies(self, num_references: int, num_patches: int) -> int:
        """A single triggered copy when every reference shares one patch (BadEncoder keeps its R identical
        copies, as it always did); one per reference otherwise."""
        return 1 if num_patches == 1 else num_references

    def objective(self, epoch: int):
        return partial(drupe_objective, lambda1=self.args.lambda1, lambda2=self.args.lambda2,
                       phase=phase_of(epoch, self.schedule), state=self.state, schedule=self.schedule,
                       generator=projection_generator(self.args.seed, epoch, self.device),
                       num_projections=self.args.drupe_projections)

    def start(self, results_dir: Path) -> None:
        if processes.is_main():  # an earlier run's, left by --overwrite
            (results_dir / BEST_CHECKPOINT).unlink(missing_ok=True)

    def after_epoch(self, epoch: int, losses: dict[str, float], model: nn.Module,
                    optimizer: torch.optim.Optimizer, results_dir: Path, target_label: int) -> dict[str, float]:
        """Advance the run past `epoch` (costs, best candidate; a new best is written to best.pth at once, as DRUPE
        does, and kept in memory); returns the costs the epoch trained with, for its log row."""
        costs = {'cost_spread': self.state.cost_spread, 'cost_dist': self.state.cost_dist}
        self.state = end_of_epoch(self.state, epoch, losses, self.schedule)
        if self.state.best_epoch == epoch:
            self.best_weights = {key: value.detach().to('cpu', copy=True)
                                 for key, value in model.state_dict().items()}
            save_run_checkpoint(results_dir / BEST_CHECKPOINT, model, optimizer, epoch, self.args,
                                target_label=target_label, drupe_state=asdict(self.state))
            print(f'DRUPE: epoch {epoch} is the best candidate so far (swd {losses["swd"]:.4f}), '
                  f'saved {BEST_CHECKPOINT}')
        return costs

    def selected_epoch(self) -> int:
        """The epoch whose encoder is DRUPE's output: the best candidate, or the last epoch (--drupe_output last,
        or no candidate)."""
        best = self.state.best_epoch
        return best if self.args.drupe_output == 'best' and best else self.args.epochs

    def checkpoint_keys(self, epoch: int, model: nn.Module) -> dict:
        """DRUPE's part of a checkpoint: its state and best weights (to resume), and in the last epoch's the
        output."""
        keys = {'drupe_state': asdict(self.state)}
        if self.best_weights is not None:
            keys['drupe_best'] = self.best_weights
        if epoch == self.args.epochs:
            keys['selected_epoch'] = self.selected_epoch()
            if keys['selected_epoch'] != epoch:
                # These override encoder_checkpoint's keys: the file's encoder is the selected one, which the next
                # stages load, and --resume (a longer run) continues from the last weights.
                keys.update(state_dict=self.best_weights, last_state_dict=model.state_dict())
        return keys

    def restore(self, checkpoint: dict) -> None:
        self.state = DrupeState(**checkpoint['drupe_state'])
        self.best_weights = checkpoint.get('drupe_best')

    def describe_output(self) -> str:
        select_after = self.schedule.select_after
        if self.args.drupe_output == 'best' and self.state.best_epoch:
            return (f'DRUPE output: epoch {self.state.best_epoch}, the smallest swd ({self.state.best_swd:.4f}) '
                    f'among the epochs > {select_after} that met its targets (also in {BEST_CHECKPOINT})')
        reason = ('--drupe_output last' if self.args.drupe_output == 'last'
                  else f'no epoch > {select_after} met its targets')
        return f'DRUPE output: the last epoch, {self.args.epochs} ({reason})'
