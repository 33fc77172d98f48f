"""Stage 2, the baselines: purify a suspect encoder with one of the eight defences MIMIC is compared with.

Every defence works under MIMIC's threat model: the suspect encoder (`--teacher`, the flag MIMIC.py uses) and
a small clean, unlabelled subset D of its pre-training set (`--ratio`, `--subset`: the same images MIMIC.py
takes), nothing else. The methods live in `defences/` (one module each; its docstring gives the paper, the
published recipe and what was adapted to the label-free setting):

    ft      fine-tuning: SimCLR (NT-Xent) training of the suspect on D
    fp      Fine-Pruning (RAID 2018): prune layer4's least active channels until the features' agreement with the
            suspect's drops, then fine-tune
    nad     Neural Attention Distillation (ICLR 2021): fine-tuned teacher, NT-Xent + attention distillation
    clp     Channel Lipschitzness-based Pruning (ECCV 2022): data-free, prunes high-Lipschitz channels
    anp     Adversarial Neuron Pruning (NeurIPS 2021): masks learnt against adversarial BN perturbations, NT-Xent on D
    kd      plain knowledge distillation into a fresh student (CVPR 2022): no attention, no MI
    invert  DECREE's trigger inversion and verdict (CVPR 2023), then trigger-augmented fine-tuning
    sslcleanse  SSL-Cleanse's mitigation (ECCV 2024) after DECREE's inversion: distillation from a frozen copy of
            the suspect

    python baseline_defence.py --defence fp --teacher runs/backdoor/model_200.pth --pretraining_dataset cifar10 \
        --ratio 0.04 --epochs 100 --results_dir runs/fp
    # offline, on the synthetic set
    python baseline_defence.py --defence clp --teacher <encoder.pth> --pretraining_dataset synthetic_shapes \
        --results_dir /tmp/clp --device cpu

Writes to --results_dir: args.json, log.csv (defences that train; NAD also teacher_log.csv), the purified
encoder model_<epochs>.pth (model_0.pth for clp and anp, which train no weight) — a plain SimCLR state_dict
that stage 3, MIMIC.py and the original code load — and, last, defence.json: what the defence did (channels
pruned per layer, the inverted trigger's size, epochs, images used) and its wall-clock seconds. `--resume`
continues a defence that trains from its latest checkpoint.

Under `torchrun --nproc_per_node N baseline_defence.py ...` the defences that train (ft, fp, nad, kd, invert,
sslcleanse) train on N processes (--batch_size is the global batch; common/distributed.py); what fp, invert and
sslcleanse compute before training (the pruning mask, the inverted trigger) is computed once, in rank 0, and sent to the others; clp and
anp, which train no weight, run in rank 0 alone.
"""
from __future__ import annotations

from core.cli import run_main
from defences import BASELINES, get_defence, stage
from defences.baselines import DEFAULT_LR, get_args_parser


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    stage.check_args(args, [get_defence(name) for name in BASELINES])
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.defence, 1e-3)
    stage.run(parser, args, args.defence, get_defence(args.defence))


if __name__ == '__main__':
    run_main(main)
