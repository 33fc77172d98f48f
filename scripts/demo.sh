#!/usr/bin/env bash
# The whole story on a CPU in 12-19 minutes (README.md, "The demo"), offline:
#   synthetic data -> clean SimCLR encoder -> BadEncoder backdoor -> MIMIC purification
#   -> ACC / ASR of all three encoders on a synthetic downstream task (digits, target "one").
#
#   bash scripts/demo.sh [OUT_DIR]        # default runs/demo; prints the table, writes OUT_DIR/summary.json
#   DEFENCES=all bash scripts/demo.sh OUT # also the eight baseline defences on the same backdoored encoder
#                                         # (or a list: DEFENCES=ft,clp); summary.json gains "defences"
#   ATTACK=drupe bash scripts/demo.sh OUT # DRUPE instead of BadEncoder (3 references of the digit "one")
#   ATTACK=ctrl bash scripts/demo.sh OUT  # CTRL: 1% of the shapes' class 0 ("disc") poisoned with CTRL's
#                                         # frequency trigger, SimCLR on them; evaluated on the shapes, target 0
#   SEEDS=0,1,2 bash scripts/demo.sh OUT  # the demo once per seed, each a whole run in OUT/seed_<seed>/ (every
#                                         # stage with that seed; the data and reference in OUT/ shared);
#                                         # OUT/summary.json: each number the mean over the seeds, with n,
#                                         # <metric>_std, <metric>_ci95 (95% half-width) and per_seed beside it;
#                                         # OUT/table.md: mean ± half-width (scripts/run_pipeline.sh --seeds)
#
# PYTHON=/path/to/venv/bin/python bash scripts/demo.sh   # another interpreter (default: the `python` first on PATH)
#
# The scale (image counts, encoder width, epochs, ratio, learning rates) is chosen to fit a 2-core CPU;
# the methods and metrics are exactly those of the full pipeline (scripts/run_pipeline.sh).
# Run it again and finished stages are skipped.
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${1:-runs/demo}
mkdir -p "$OUT"
start=$(date +%s)

# --- demo scale -------------------------------------------------------------------------------
PRETRAIN_SIZES=${PRETRAIN_SIZES:-train=4000,test=1000}
DOWNSTREAM_SIZES=${DOWNSTREAM_SIZES:-train=2000,test=1000}
WIDTH=${WIDTH:-8}
CLEAN_EPOCHS=${CLEAN_EPOCHS:-20}
case "${ATTACK:-badencoder}" in
  # DRUPE's terms start at epoch 2 (effectiveness) and 5 (distribution); its costs adapt after epoch 5 and its
  # output is chosen among epochs 9-15: its 120-epoch schedule (adapt after 20, choose after 24) compressed
  drupe) BAD_EPOCHS=${BAD_EPOCHS:-15} ;;
  ctrl) BAD_EPOCHS=${BAD_EPOCHS:-$CLEAN_EPOCHS} ;;  # CTRL's backdoored encoder is SimCLR on the poisoned set
  *) BAD_EPOCHS=${BAD_EPOCHS:-5} ;;
esac
# 120: chosen on seeds 0, 1, 2 (40 and 80 left the backdoor on some: docs/DEMO_EXPERIMENTS.md section 7.3); on five
# held-out seeds MIMIC brought ASR* under 20 on 5 of 5, on another CPU kind not always (docs/REPRODUCING.md,
# "Choosing a setting and confirming it on held-out seeds")
MIMIC_EPOCHS=${MIMIC_EPOCHS:-120}
# DRUPE's adaptive costs and output choice within the demo's 15 epochs (docs/DEMO_EXPERIMENTS.md section 2)
DRUPE_DEMO_SCHEDULE=${DRUPE_DEMO_SCHEDULE:---drupe_adapt_after 5 --drupe_select_after 8}
MI_EPOCHS=${MI_EPOCHS:-20}
NN_EPOCHS=${NN_EPOCHS:-400}  # 100 leaves MIMIC's ASR unconverged (docs/DEMO_EXPERIMENTS.md, "The probe's length")
RATIO=${RATIO:-0.25}
DEFENCES=${DEFENCES:-}
ATTACK=${ATTACK:-badencoder}
SEEDS=${SEEDS:-}  # empty: one run with the stages' default seed, in OUT itself
ANP_ITERATIONS=${ANP_ITERATIONS:-2000}
MIMIC_LR=${MIMIC_LR:-0.01}
BAD_LR=${BAD_LR:-0.01}
PROBE_LR=${PROBE_LR:-0.001}
# the augmentation path of the training stages: tensor (batches augmented as tensors, the same distributions as
# the original's per-image PIL transforms, about 1.8x faster on a 2-core CPU) or pil (the original's path)
AUGMENT=${AUGMENT:-tensor}
# -----------------------------------------------------------------------------------------------

data="$OUT/data"
[ -f "$data/synthetic_shapes/train.npz" ] || \
  "$PYTHON" -m datasets.prepare synthetic_shapes --out "$data" --sizes "$PRETRAIN_SIZES" --seed 1
[ -f "$data/synthetic_digits/train.npz" ] || \
  "$PYTHON" -m datasets.prepare synthetic_digits --out "$data" --sizes "$DOWNSTREAM_SIZES" --seed 2
case "$ATTACK" in
  badencoder)
    attack_flags=(--reference_file "$OUT/reference_one.npz" --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz
                  --badencoder_args "--batch_size 128 --lr $BAD_LR")
    [ -f "$OUT/reference_one.npz" ] || \
      "$PYTHON" reference/make_reference.py --dataset synthetic_digits --data_root "$data" --class_id 1 \
        --first 1 --out "$OUT/reference_one.npz" ;;
  drupe)  # DRUPE's recipe (lr 0.05, 3 references) on the demo's whole shadow set, batch 128, its schedule compressed
    attack_flags=(--attack drupe --reference_file "$OUT/reference_three.npz"
                  --trigger_file trigger/trigger_pt_white_21_10_ap_replace.npz
                  --badencoder_args "--batch_size 128 --shadow_fraction 1.0 $DRUPE_DEMO_SCHEDULE")
    [ -f "$OUT/reference_three.npz" ] || \
      "$PYTHON" reference/make_reference.py --dataset synthetic_digits --data_root "$data" --class_id 1 \
        --first 3 --out "$OUT/reference_three.npz" ;;
  ctrl)  # CTRL's trigger on 1% of the pre-training set (class 0); stage 0 on the poisoned copy
    [ -f "$OUT/trigger_ctrl.npz" ] || "$PYTHON" trigger/make_trigger.py --kind ctrl --out "$OUT/trigger_ctrl.npz"
    attack_flags=(--attack ctrl --target_class 0 --poison_rate "${POISON_RATE:-0.01}"
                  --trigger_file "$OUT/trigger_ctrl.npz") ;;
  *) echo "demo.sh: ATTACK must be badencoder, drupe or ctrl, got '$ATTACK'" >&2; exit 2 ;;
esac
seed_flags=()
[ -z "$SEEDS" ] || seed_flags=(--seeds "$SEEDS")

bash scripts/run_pipeline.sh --run_dir "$OUT" --data_root "$data" --device "${DEVICE:-cpu}" \
  --pretraining_dataset synthetic_shapes --downstream_dataset synthetic_digits "${attack_flags[@]}" \
  --width "$WIDTH" --clean_epochs "$CLEAN_EPOCHS" --badencoder_epochs "$BAD_EPOCHS" \
  --mimic_epochs "$MIMIC_EPOCHS" --mi_epochs "$MI_EPOCHS" --nn_epochs "$NN_EPOCHS" \
  --ratio "$RATIO" --mimic_lr "$MIMIC_LR" --save_freq 5 --augment "$AUGMENT" \
  --clean_args "--batch_size 256" \
  --mimic_args "--batch_size 128" --eval_args "--lr $PROBE_LR --no_progress" \
  --defences "$DEFENCES" --defence_args "--batch_size 128 --anp_iterations $ANP_ITERATIONS" \
  ${seed_flags[@]+"${seed_flags[@]}"}

echo "demo finished in $(( $(date +%s) - start )) s; summary: $OUT/summary.json"
cat "$OUT/summary.json"
