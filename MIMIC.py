"""Stage 2 — MIMIC: distil a clean student from a suspect (backdoored) encoder (docs/DESIGN.md §6).

The teacher is the suspect encoder, frozen. The student is a freshly initialised SimCLR of the same
architecture. Before distillation, the mutual information between each tapped layer and the
representation is estimated (MINE / Donsker–Varadhan, §6.1) and turned into attention-loss weights
(§6.2). The student then learns from a small clean subset D of the pre-training set with
    L = L_con + Σ_l opt_l · AT(S_l(x1), T_l(x1)) + opt5 · L_clone      (§6.3)
and the purified student is saved as `model<epoch>.pth` (no underscore, as the original).

The original README command:

    python -u MIMIC.py --lr 1e-2 --batch_size 128 --epochs 1000 --pretraining_dataset cifar10 \
        --teacher output/cifar10/badencoder/model_200.pth --ratio 0.04 --results_dir output/cifar10/mimic/

A quick CPU run on the offline synthetic set (`python -m datasets.prepare synthetic_shapes`):

    python MIMIC.py --pretraining_dataset synthetic_shapes --teacher <encoder.pth> --ratio 0.05 \
        --batch_size 64 --epochs 2 --mi_epochs 5 --results_dir /tmp/mimic

The paper's ablations are one flag each: `--layer_weights uniform` (no MI step, equal layer weights),
`--no_attention`, `--no_clone`, `--no_contrastive` (see defences/mimic.py).

Writes to --results_dir: args.json, mi.json (MI per layer, weights, opt values), log.csv (one row per
epoch), the checkpoints and, last, defence.json (what ran, its wall-clock seconds). `--resume` continues the latest
checkpoint; the MI step is not repeated. MIMIC is one defence of stage 2 (defences/mimic.py); this command line and
baseline_defence.py's share one driver (defences/stage.py).

Under `torchrun --nproc_per_node N MIMIC.py ...` the distillation runs on N processes (--batch_size is the global
batch; common/distributed.py); the MI step runs once, in rank 0, and its layer weights are sent to the others.
"""
from __future__ import annotations

from core.cli import run_main
from defences import mimic, stage


def main(argv: list[str] | None = None) -> None:
    parser = mimic.get_args_parser()
    args = parser.parse_args(argv)
    stage.check_args(args, [mimic])
    stage.run(parser, args, 'mimic', mimic)


if __name__ == '__main__':
    run_main(main)
