#!/usr/bin/env bash
# The paper's experiments, each as one table (Markdown and CSV), from one command.
#
#   python -m datasets.prepare cifar10 stl10 gtsrb svhn --download        # once, for --scale paper
#   bash scripts/reproduce_paper.sh [--experiments LIST] [--scale paper|demo] [--dry_run] [RUNS_DIR]
#
#   --experiments  comma-separated, default all = main,ratio,trigger_size,ablation,mi_model,triggers
#     main          CIFAR10 pre-training; GTSRB "priority road" (12), SVHN "one" (1), STL10 "truck" (9); attacks
#                   BadEncoder and DRUPE on each target task, and CTRL (data poisoning: CIFAR10's own classes,
#                   target 0); MIMIC and the seven baseline defences on every backdoored encoder
#     ratio         MIMIC at clean-data fractions 0.01, 0.02, 0.04, 0.06, 0.08, 0.10 (the first task's BadEncoder)
#     trigger_size  BadEncoder with white square patches of 5, 10, 15, 20 pixels at the bottom right, then MIMIC
#     ablation      MIMIC without MI guidance (uniform weights), without attention, clone or contrastive loss
#     mi_model      MI measured on the teacher (the paper, our default) against the initial student (the
#                   released code's choice)
#     triggers      BadEncoder and MIMIC with the paper's 10x10 patch at other positions and in other colours
#   --scale paper   the paper's settings (SPEC §8): ResNet18, SimCLR 1000 epochs, BadEncoder 200, DRUPE 120,
#                   CTRL's SimCLR recipe (SGD lr 0.06, cosine, 800 epochs), MIMIC 1000 with ratio 0.04 and
#                   lr 1e-2, MI 200, probe 1000; on a GPU machine (days for the whole list)
#   --scale demo    the same list on the offline synthetic sets at the demo's scale (scripts/demo.sh), on a CPU
#   --dry_run       print every command in order and run nothing (needs no data, creates nothing)
#
# RUNS_DIR (default runs/paper, or runs/paper_demo with --scale demo) holds clean/ (the clean encoder, trained
# once for everything), trigger_files/ (the generated trigger files) and one folder per experiment with one
# pipeline run per variant, the experiment's table.md / table.csv (+ table_defences.csv) and, when matplotlib
# is installed (requirements-plot.txt), its figures/ (scripts/plot_results.py). Shared stages are
# trained once: each backdoored encoder of main is reused by ratio, ablation and mi_model. Running the script
# again skips what is finished and resumes what was interrupted. Extra flags for every stage: EXTRA="--amp".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

experiments=main,ratio,trigger_size,ablation,mi_model,triggers scale=paper dry_run=0 RUNS=''
die() { echo "reproduce_paper.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --experiments) [ $# -ge 2 ] || die "--experiments needs a value"; experiments=$2; shift 2 ;;
    --scale) [ $# -ge 2 ] || die "--scale needs a value"; scale=$2; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    -*) die "unknown option $1 (see the header of $0)" ;;
    *) [ -z "$RUNS" ] || die "one RUNS_DIR only, got '$RUNS' and '$1'"; RUNS=$1; shift ;;
  esac
done
[ "$experiments" != all ] || experiments=main,ratio,trigger_size,ablation,mi_model,triggers
for e in ${experiments//,/ }; do
  [[ ",main,ratio,trigger_size,ablation,mi_model,triggers," == *",$e,"* ]] || \
    die "--experiments: unknown experiment '$e' (expected main, ratio, trigger_size, ablation, mi_model, triggers)"
done
wants() { [[ ",$experiments," == *",$1,"* ]]; }

# --- scale ---------------------------------------------------------------------------------------------
case "$scale" in
  paper)
    RUNS=${RUNS:-runs/paper} DEVICE=${DEVICE:-auto} DATA_ROOT=${DATA_ROOT:-data}
    PRE=cifar10 REF_DIR=reference/cifar10 TASKS="gtsrb:priority:12 svhn:one:1 stl10:truck:9"
    WIDTH=64 E0=1000 E1=200 E1_DRUPE=120 E1_CTRL=800 E2=1000 MI=200 NN=1000 RATIO=0.04 MIMIC_LR=0.01
    CLEAN_ARGS='' BAD_ARGS='' DRUPE_ARGS='' MIMIC_ARGS='' EVAL_ARGS='' DEFENCE_ARGS=''
    CTRL_ARGS='--optimizer sgd --lr 0.06 --momentum 0.9 --weight_decay 5e-4 --schedule cosine --warmup_epochs 10 --batch_size 512'
    BATCH_FOR_RATIO='' AUGMENT=auto ;;
  demo)  # scripts/demo.sh's scale
    RUNS=${RUNS:-runs/paper_demo} DEVICE=${DEVICE:-cpu} DATA_ROOT=${DATA_ROOT:-$RUNS/data}
    PRE=synthetic_shapes REF_DIR=$RUNS/reference TASKS="synthetic_digits:one:1"
    WIDTH=8 E0=20 E1=5 E1_DRUPE=15 E1_CTRL=20 E2=40 MI=20 NN=400 RATIO=0.25 MIMIC_LR=0.01
    CLEAN_ARGS='--batch_size 256' BAD_ARGS='--batch_size 128 --lr 0.01'
    DRUPE_ARGS='--batch_size 128 --shadow_fraction 1.0 --drupe_adapt_after 5 --drupe_select_after 8'
    CTRL_ARGS='--batch_size 256'
    MIMIC_ARGS='--batch_size 128' EVAL_ARGS='--lr 0.001 --no_progress'
    DEFENCE_ARGS='--batch_size 128 --anp_iterations 200'
    BATCH_FOR_RATIO='--batch_size 32' AUGMENT=tensor ;;  # 1% of 4000 images is 40: one batch needs fewer than 128
  *) die "--scale: expected paper or demo, got '$scale'" ;;
esac
[ -z "${EXTRA:-}" ] || { CLEAN_ARGS+=" $EXTRA" BAD_ARGS+=" $EXTRA" DRUPE_ARGS+=" $EXTRA" CTRL_ARGS+=" $EXTRA"
                         MIMIC_ARGS+=" $EXTRA" EVAL_ARGS+=" $EXTRA" DEFENCE_ARGS+=" $EXTRA"; }
PAPER_TRIGGER=trigger/trigger_pt_white_21_10_ap_replace.npz

# run CMD...: the command, or only its printout with --dry_run
run() {
  if [ "$dry_run" = 1 ]; then echo "$*"; else "$@"; fi
}
# pipeline RUN_DIR LABEL ARGS...: one pipeline run at this scale (its stage commands printed with --dry_run)
pipeline() {
  local dir=$1 label=$2; shift 2
  bash scripts/run_pipeline.sh --run_dir "$dir" --label "$label" --dry_run "$dry_run" --device "$DEVICE" \
    --data_root "$DATA_ROOT" --pretraining_dataset "$PRE" --width "$WIDTH" --clean_epochs "$E0" \
    --mimic_epochs "$E2" --mi_epochs "$MI" --nn_epochs "$NN" --ratio "$RATIO" --mimic_lr "$MIMIC_LR" \
    --clean_encoder "$CLEAN" --augment "$AUGMENT" --eval_args "$EVAL_ARGS" --defence_args "$DEFENCE_ARGS" "$@"
}
table() {  # OUT_STEM RUN_DIR...: the experiment's table, and its figures when matplotlib is installed
  local out=$1; shift
  run "$PYTHON" scripts/results_table.py "$@" --out "$out"
  if [ "$dry_run" = 1 ] || "$PYTHON" -c 'import matplotlib' 2> /dev/null; then
    run "$PYTHON" scripts/plot_results.py "$@" --out "$(dirname "$out")/figures"
  else
    echo "note: no figures for $(dirname "$out") (pip install -r requirements-plot.txt, then run scripts/plot_results.py)"
  fi
}
with_mimic_args() { echo "$MIMIC_ARGS $*"; }
# reuse_evals RUN_DIR: the base run's probes of the clean and the shared backdoored encoder, copied into a run that
# evaluates the same two encoder files with the same trigger, reference and probe (ratio, ablation, mi_model), so
# that its pipeline skips them (it still re-evaluates a copy whose encoder file or probe length differs).
reuse_evals() {
  local dir=$1 name
  [ "$dry_run" = 0 ] || return 0
  for name in clean backdoored; do
    [ -f "$BASE/eval_$name/metrics.json" ] && [ ! -e "$dir/eval_$name" ] || continue
    mkdir -p "$dir"
    cp -r "$BASE/eval_$name" "$dir/"
    [ ! -f "$BASE/eval_$name.log" ] || cp "$BASE/eval_$name.log" "$dir/"
    echo "== eval_$name: the same encoder, trigger and probe as $BASE; its result copied"
  done
}

# --- data, references, the clean encoder (once) ---------------------------------------------------------
if [ "$scale" = demo ] && [ ! -f "$DATA_ROOT/synthetic_digits/test.npz" ]; then
  run "$PYTHON" -m datasets.prepare synthetic_shapes --out "$DATA_ROOT" --sizes train=4000,test=1000 --seed 1
  run "$PYTHON" -m datasets.prepare synthetic_digits --out "$DATA_ROOT" --sizes train=2000,test=1000 --seed 2
fi
for task in $TASKS; do
  IFS=: read -r downstream name label <<< "$task"
  for count in 1 3; do  # BadEncoder's single reference; DRUPE's three
    file=$REF_DIR/$name$([ $count = 1 ] || echo _$count).npz
    [ -f "$file" ] || run "$PYTHON" reference/make_reference.py --dataset "$downstream" --data_root "$DATA_ROOT" \
      --class_id "$label" --first "$count" --out "$file"
  done
done
CLEAN=$RUNS/clean/model_$E0.pth
if [ ! -f "$CLEAN" ]; then
  resume=()
  compgen -G "$RUNS/clean/model_*.pth" > /dev/null && resume=(--resume)
  # shellcheck disable=SC2086
  run "$PYTHON" -u train_clean_encoder.py --pretraining_dataset "$PRE" --width "$WIDTH" --epochs "$E0" \
    --save_freq 50 --results_dir "$RUNS/clean" --device "$DEVICE" --data_root "$DATA_ROOT" --augment "$AUGMENT" $CLEAN_ARGS "${resume[@]}"
fi
make_trigger() {  # NAME make_trigger.py-flags...: RUNS/trigger_files/NAME.npz, made once
  local name=$1; shift
  [ -f "$RUNS/trigger_files/$name.npz" ] || run "$PYTHON" trigger/make_trigger.py "$@" --out "$RUNS/trigger_files/$name.npz"
}

# The first task's BadEncoder run: main's first row, and the backdoored encoder of ratio, ablation, mi_model.
IFS=: read -r first_task first_ref _ <<< "${TASKS%% *}"
BASE=$RUNS/main/${PRE}_${first_task}_badencoder
BASE_BACKDOOR=$BASE/backdoor/model_$E1.pth
base_run() {
  pipeline "$BASE" '' --attack badencoder --downstream_dataset "$first_task" \
    --reference_file "$REF_DIR/$first_ref.npz" --trigger_file "$PAPER_TRIGGER" --badencoder_epochs "$E1" \
    --badencoder_args "$BAD_ARGS" --mimic_args "$MIMIC_ARGS" "$@"
}

# --- experiments ------------------------------------------------------------------------------------------
if wants main; then
  main_runs=()
  for task in $TASKS; do
    IFS=: read -r downstream name _ <<< "$task"
    dir=$RUNS/main/${PRE}_${downstream}_badencoder
    if [ "$dir" = "$BASE" ]; then
      base_run --defences all
    else
      pipeline "$dir" '' --attack badencoder --downstream_dataset "$downstream" --reference_file "$REF_DIR/$name.npz" \
        --trigger_file "$PAPER_TRIGGER" --badencoder_epochs "$E1" --badencoder_args "$BAD_ARGS" \
        --mimic_args "$MIMIC_ARGS" --defences all
    fi
    pipeline "$RUNS/main/${PRE}_${downstream}_drupe" '' --attack drupe --downstream_dataset "$downstream" \
      --reference_file "$REF_DIR/${name}_3.npz" --trigger_file "$PAPER_TRIGGER" --badencoder_epochs "$E1_DRUPE" \
      --badencoder_args "$DRUPE_ARGS" --mimic_args "$MIMIC_ARGS" --defences all
    main_runs+=("$dir" "$RUNS/main/${PRE}_${downstream}_drupe")
  done
  make_trigger ctrl --kind ctrl
  pipeline "$RUNS/main/${PRE}_${PRE}_ctrl" '' --attack ctrl --target_class 0 --poison_rate 0.01 \
    --trigger_file "$RUNS/trigger_files/ctrl.npz" --badencoder_epochs "$E1_CTRL" --badencoder_args "$CTRL_ARGS" \
    --mimic_args "$MIMIC_ARGS" --defences all
  table "$RUNS/main/table" "${main_runs[@]}" "$RUNS/main/${PRE}_${PRE}_ctrl"
fi

if wants ratio || wants ablation || wants mi_model; then
  [ -f "$BASE_BACKDOOR" ] && [ "$dry_run" = 0 ] || base_run  # the shared backdoored encoder (skipped when done)
fi

if wants ratio; then
  ratio_runs=()
  for ratio in 0.01 0.02 0.04 0.06 0.08 0.10; do
    dir=$RUNS/ratio/ratio_$ratio
    reuse_evals "$dir"
    pipeline "$dir" "ratio $ratio" --attack badencoder --downstream_dataset "$first_task" \
      --reference_file "$REF_DIR/$first_ref.npz" --trigger_file "$PAPER_TRIGGER" --backdoored_encoder "$BASE_BACKDOOR" \
      --badencoder_epochs "$E1" --ratio "$ratio" --mimic_args "$(with_mimic_args "$BATCH_FOR_RATIO")"
    ratio_runs+=("$dir")
  done
  table "$RUNS/ratio/table" "${ratio_runs[@]}"
fi

if wants ablation; then
  ablation_runs=("$BASE")
  for variant in "uniform:--layer_weights uniform" "no_attention:--no_attention" "no_clone:--no_clone" \
                 "no_contrastive:--no_contrastive"; do
    name=${variant%%:*} flags=${variant#*:}
    reuse_evals "$RUNS/ablation/$name"
    pipeline "$RUNS/ablation/$name" "$name" --attack badencoder --downstream_dataset "$first_task" \
      --reference_file "$REF_DIR/$first_ref.npz" --trigger_file "$PAPER_TRIGGER" --backdoored_encoder "$BASE_BACKDOOR" \
      --badencoder_epochs "$E1" --mimic_args "$(with_mimic_args "$flags")"
    ablation_runs+=("$RUNS/ablation/$name")
  done
  table "$RUNS/ablation/table" "${ablation_runs[@]}"
fi

if wants mi_model; then
  reuse_evals "$RUNS/mi_model/student"
  pipeline "$RUNS/mi_model/student" "MI on the initial student" --attack badencoder --downstream_dataset "$first_task" \
    --reference_file "$REF_DIR/$first_ref.npz" --trigger_file "$PAPER_TRIGGER" --backdoored_encoder "$BASE_BACKDOOR" \
    --badencoder_epochs "$E1" --mimic_args "$(with_mimic_args --mi_model student)"
  table "$RUNS/mi_model/table" "$BASE" "$RUNS/mi_model/student"
fi

# trigger_size and triggers: a backdoor per trigger (each with its own BadEncoder run), then MIMIC
trigger_runs() {  # EXPERIMENT NAME:make_trigger-flags...
  local experiment=$1; shift
  local runs=()
  for spec in "$@"; do
    local name=${spec%%:*} flags=${spec#*:}
    # shellcheck disable=SC2086
    make_trigger "$name" $flags
    pipeline "$RUNS/$experiment/$name" "$name" --attack badencoder --downstream_dataset "$first_task" \
      --reference_file "$REF_DIR/$first_ref.npz" --trigger_file "$RUNS/trigger_files/$name.npz" --badencoder_epochs "$E1" \
      --badencoder_args "$BAD_ARGS" --mimic_args "$MIMIC_ARGS"
    runs+=("$RUNS/$experiment/$name")
  done
  table "$RUNS/$experiment/table" "${runs[@]}"
}
if wants trigger_size; then
  trigger_runs trigger_size "white_5:--size 5 --row 26 --col 26" "white_10:--size 10 --row 21 --col 21" \
    "white_15:--size 15 --row 16 --col 16" "white_20:--size 20 --row 11 --col 11"
fi
if wants triggers; then
  trigger_runs triggers "white_top_left:--row 1 --col 1" "white_top_right:--row 1 --col 21" \
    "white_bottom_left:--row 21 --col 1" "white_centre:--row 11 --col 11" "black_21:--colour black" \
    "red_21:--colour 255,0,0"
fi
[ "$dry_run" = 1 ] || echo "tables: $(ls "$RUNS"/*/table.md 2>/dev/null | tr '\n' ' ')"
