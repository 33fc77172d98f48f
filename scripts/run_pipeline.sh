#!/usr/bin/env bash
# Chain the four stages for one setting, each stage in its own folder under one run directory:
#
#   RUN/clean/       stage 0  train_clean_encoder.py          -> model_<E0>.pth
#   RUN/backdoor/    stage 1  train_badencoder.py [--attack drupe] -> model_<E1>.pth
#                    (--attack ctrl: RUN/poisoned_data/ = python -m datasets.poison, then stage 0 on it
#                     -> model_<E0>.pth; the clean row keeps its own stage 0)
#   RUN/mimic/       stage 2  MIMIC.py                        -> model<E2>.pth (+ mi.json)
#   RUN/defence_<d>/ stage 2  baseline_defence.py --defence d -> model_<E>.pth, defence.json  (--defences)
#   RUN/eval_clean/, RUN/eval_backdoored/, RUN/eval_mimic/, RUN/eval_<d>/
#                    stage 3  training_downstream_classifier.py -> metrics.json, one run for all the encoders
#                    (--encoder ... --names eval_clean ...: their probes trained together, each as its own run)
#   RUN/run.json     the setting;  RUN/<stage>.log  what each stage printed (RUN/eval.log: stage 3's run);
#   <stage folder>/stage_seconds.txt  the stage's wall time (summed over the runs that resumed it);
#   RUN/eval_seconds.txt  stage 3's (summed over its runs)
#
# Run it again and a finished stage is skipped; an interrupted one continues with --resume from its
# latest checkpoint; stage 3 probes only the encoders whose metrics.json is missing or was made for another
# encoder file or probe length. Example (the paper's CIFAR10 -> GTSRB setting, on a GPU machine):
#
#   bash scripts/run_pipeline.sh --run_dir runs/cifar10_gtsrb --pretraining_dataset cifar10 \
#       --downstream_dataset gtsrb --reference_file reference/cifar10/priority.npz \
#       --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz
#
# Options (default):
#   --run_dir DIR (required)            --pretraining_dataset cifar10      --downstream_dataset gtsrb
#   --reference_file F (required but with ctrl)   --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz
#   --attack badencoder|drupe|ctrl (badencoder)   --target_class 0 and --poison_rate 0.01 (ctrl: the poisoned
#                          class of the pre-training set; the downstream task becomes the pre-training set
#                          itself, with that class as the target, as CTRL evaluates)
#   --clean_epochs 1000  --badencoder_epochs 200 (drupe: 120, DRUPE's)  --mimic_epochs 1000  --mi_epochs 200
#   --nn_epochs 1000
#   --ratio 0.04  --mimic_lr 0.01  --arch resnet18  --width 64  --device auto  --data_root data
#   --num_workers 2  --seed 100  --save_freq 50 (stage 0 and 2 checkpoints, for resuming)
#   --augment auto|pil|tensor (auto)   the augmentation path of stages 0-2 and the defences: pil, the original's
#                          per-image PIL transforms in worker processes; tensor, whole batches on the device with
#                          the same distributions (about 1.8x faster on a 2-core CPU); auto, tensor on CUDA only
#   --seeds LIST           comma-separated seeds (e.g. 0,1,2), instead of --seed: the setting once per seed, each a
#                          whole run (the layout above) in RUN/seed_<seed>/ whose every stage gets --seed <seed> (the
#                          clean encoder too, unless --clean_encoder is given) and whose run.json holds it; then one
#                          table of them: RUN/table.md (a cell: mean ± half-width of its 95% confidence interval over
#                          the seeds; each baseline against MIMIC on the same seeds), RUN/table.csv,
#                          RUN/table_seeds.csv (one row per seed), RUN/summary.json (+ RUN/table_defences.csv)
#   --clean_encoder PATH   use this encoder instead of training stage 0
#   --backdoored_encoder PATH  use this backdoored encoder instead of stage 1 (e.g. one trained by another
#                          run, to compare defences or MIMIC settings on the same backdoor)
#   --label TEXT           a name for the run, kept in run.json and shown by results_table.py
#   --dry_run              print every stage's command in order and run nothing (no file is read or written)
#   --defences LIST        baseline defences run beside MIMIC on the backdoored encoder, comma-separated
#                          (ft,fp,nad,clp,anp,kd,invert,sslcleanse or all; default: none); the ones that train get
#                          --epochs = --mimic_epochs, MIMIC's budget, and MIMIC's --ratio
#   --mimic_curve 1        also probe every checkpoint MIMIC saved (each --save_freq epochs before the last), each
#                          in RUN/mimic_curve/mimic_<epoch>/: MIMIC's ACC and ASR over its epochs
#   --clean_args "..." --badencoder_args "..." --mimic_args "..." --defence_args "..." --eval_args "..."
#                          extra flags per stage (--defence_args goes to every baseline defence)
#
# The work is done by scripts/pipeline.py (python -m scripts.pipeline); this wrapper runs it from the
# repository root with $PYTHON (default: the `python` first on PATH): PYTHON=/path/to/venv/bin/python runs a
# virtual environment's interpreter without activating it. -h / --help prints this header.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m scripts.pipeline "$@"
