#!/usr/bin/env bash
# The paper's experiments, each as one table (Markdown and CSV), from one command.
#
#   python -m datasets.prepare cifar10 stl10 gtsrb svhn --download        # once, for --scale paper
#   bash scripts/reproduce_paper.sh [--experiments LIST] [--scale paper|demo|proportioned] [--seeds LIST] [--dry_run]
#                                   [RUNS_DIR]
#
#   --experiments  comma-separated, default all = main,ratio,trigger_size,ablation,mi_model,triggers,budget
#                  (proportioned: main)
#     main          CIFAR10 pre-training; GTSRB "priority road" (12), SVHN "one" (1), STL10 "truck" (9); attacks
#                   BadEncoder and DRUPE on each target task, and CTRL (data poisoning: CIFAR10's own classes,
#                   target 0); MIMIC and the eight baseline defences on every backdoored encoder
#     ratio         MIMIC at clean-data fractions 0.01, 0.02, 0.04, 0.06, 0.08, 0.10 (the first task's BadEncoder)
#     trigger_size  BadEncoder with white square patches of 5, 10, 15, 20 pixels at the bottom right, then MIMIC
#     ablation      MIMIC without MI guidance (uniform weights), without attention, clone or contrastive loss
#     mi_model      MI measured on the teacher (the paper, our default) against the initial student (the
#                   released code's choice)
#     triggers      BadEncoder and MIMIC with the paper's 10x10 patch at other positions and in other colours
#     budget        MIMIC and ft with 2.5x the scale's defence epochs on the first task's backdoor (at
#                   --scale proportioned: 10% of the pre-training's image-passes instead of 4%): is MIMIC's
#                   result limited by its budget?
#   --scale paper   the paper's settings: ResNet18, SimCLR 1000 epochs, BadEncoder 200, DRUPE 120,
#                   CTRL's SimCLR recipe (SGD lr 0.06, cosine, 800 epochs), MIMIC 1000 with ratio 0.04 and
#                   lr 1e-2, MI 200, probe 1000; on a GPU machine (days for the whole list)
#   --scale demo    the same list on the offline synthetic sets at the demo's scale (scripts/demo.sh), on a CPU
#   --scale proportioned  the paper's proportions on a CPU (docs/PROPORTIONED.md): a clean encoder pre-trained on
#                   10,000 synthetic shapes until its kNN accuracy stops rising, shared by every seed; D = 4% of
#                   them; MIMIC and the eight baselines each 4% of the pre-training's image-passes (ANP's masks
#                   6.4%, DECREE's inversion 5.1% + 4%); BadEncoder a fifth of the pre-training's epochs; targets:
#                   the synthetic digits and scikit-learn's real digits (pip install -r requirements-digits.txt).
#                   Its default --experiments is main (BadEncoder only, every defence)
#   --seeds LIST    comma-separated seeds (e.g. 0,1,2): every run once per seed, in <run folder>/seed_<seed>/,
#                   every stage with --seed <seed>: a clean encoder per seed (RUNS_DIR/clean/seed_<seed>/) and
#                   each seed's own shared backdoor; each table pools the seeds of a run (mean ± 95% interval,
#                   the baselines against MIMIC on the same seeds; scripts/results_table.py). Without it: one run
#                   each, the stages' default seed, the folders below
#   --dry_run       print every command in order and run nothing (needs no data, creates nothing)
#
# RUNS_DIR (default runs/paper, runs/paper_demo or runs/paper_proportioned) holds clean/ (the clean encoder, trained
# once for everything), trigger_files/ (the generated trigger files) and one folder per experiment with one
# pipeline run per variant, the experiment's table.md / table.csv (+ table_defences.csv) and, when matplotlib
# is installed (requirements-plot.txt), its figures/ (scripts/plot_results.py). Shared stages are
# trained once: each backdoored encoder of main is reused by ratio, ablation and mi_model. Running the script
# again skips what is finished and resumes what was interrupted. Extra flags for every stage: EXTRA="--amp".
#
# The work is done by scripts/reproduce_paper.py (python -m scripts.reproduce_paper); this wrapper runs it from the
# repository root with $PYTHON (default: the `python` first on PATH): PYTHON=/path/to/venv/bin/python runs a
# virtual environment's interpreter without activating it. -h / --help prints this header.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m scripts.reproduce_paper "$@"
