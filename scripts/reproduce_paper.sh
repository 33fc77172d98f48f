#!/usr/bin/env bash
# The paper's settings (SPEC §8) on a GPU machine: CIFAR10 pre-training (ResNet18), trigger white_21_10,
# targets GTSRB "priority road" (12), SVHN "one" (1), STL10 "truck" (9); paper epochs throughout
# (SimCLR 1000, BadEncoder 200, MIMIC 1000 with MI estimation 200, probe 1000), MIMIC ratio 0.04, lr 1e-2.
#
#   python -m datasets.prepare cifar10 stl10 gtsrb svhn --download   # once
#   bash scripts/reproduce_paper.sh [RUNS_DIR]                        # default runs/paper
#
# The clean encoder is trained once and shared by the three settings. Reference files are cut from the
# prepared data when absent (the first training image of the target class; put the paper's own files in
# reference/cifar10/ to use those instead). Re-running skips finished stages and resumes interrupted ones.
# The table lands in RUNS_DIR/table.md and table.csv. Extra flags for every stage: EXTRA="--amp".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUNS=${1:-runs/paper}
DEVICE=${DEVICE:-auto}

make_reference() {  # name dataset class
  [ -f "reference/cifar10/$1.npz" ] || "$PYTHON" reference/make_reference.py --dataset "$2" \
    --class_id "$3" --first 1 --out "reference/cifar10/$1.npz"
}
make_reference priority gtsrb 12
make_reference one svhn 1
make_reference truck stl10 9

clean_encoder=''
for setting in gtsrb:priority svhn:one stl10:truck; do
  downstream=${setting%%:*} reference=${setting#*:}
  bash scripts/run_pipeline.sh --run_dir "$RUNS/cifar10_$downstream" --device "$DEVICE" \
    --pretraining_dataset cifar10 --downstream_dataset "$downstream" \
    --reference_file "reference/cifar10/$reference.npz" \
    --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz \
    --clean_epochs 1000 --badencoder_epochs 200 --mimic_epochs 1000 --mi_epochs 200 --nn_epochs 1000 \
    --ratio 0.04 --mimic_lr 0.01 \
    ${clean_encoder:+--clean_encoder "$clean_encoder"} \
    ${EXTRA:+--clean_args "$EXTRA" --badencoder_args "$EXTRA" --mimic_args "$EXTRA" --eval_args "$EXTRA"}
  clean_encoder=$RUNS/cifar10_gtsrb/clean/model_1000.pth
done

"$PYTHON" scripts/results_table.py "$RUNS"/cifar10_* --out "$RUNS/table"
