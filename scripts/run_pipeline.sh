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
#                    stage 3  training_downstream_classifier.py -> metrics.json
#   RUN/run.json     the setting;  RUN/<stage>.log  what each stage printed;
#   <stage folder>/stage_seconds.txt  the stage's wall time (summed over the runs that resumed it)
#
# Run it again and a finished stage is skipped; an interrupted one continues with --resume from its
# latest checkpoint. Example (the paper's CIFAR10 -> GTSRB setting, on a GPU machine):
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
#   --clean_encoder PATH   use this encoder instead of training stage 0
#   --backdoored_encoder PATH  use this backdoored encoder instead of stage 1 (e.g. one trained by another
#                          run, to compare defences or MIMIC settings on the same backdoor)
#   --label TEXT           a name for the run, kept in run.json and shown by results_table.py
#   --dry_run 1            print every stage's command in order and run nothing (no file is read or written)
#   --defences LIST        baseline defences run beside MIMIC on the backdoored encoder, comma-separated
#                          (ft,fp,nad,clp,anp,kd,invert or all; default: none); the ones that train get
#                          --epochs = --mimic_epochs, MIMIC's budget, and MIMIC's --ratio
#   --clean_args "..." --badencoder_args "..." --mimic_args "..." --defence_args "..." --eval_args "..."
#                          extra flags per stage (--defence_args goes to every baseline defence)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

run_dir='' pretraining=cifar10 downstream=gtsrb reference='' trigger=trigger/trigger_pt_white_21_10_ap_replace.npz
clean_epochs=1000 bad_epochs='' attack=badencoder target_class=0 poison_rate=0.01 mimic_epochs=1000 mi_epochs=200 nn_epochs=1000 ratio=0.04 mimic_lr=0.01
arch=resnet18 width=64 device=auto data_root=data num_workers=2 seed=100 save_freq=50 clean_encoder=''
clean_args='' bad_args='' mimic_args='' eval_args='' defence_args='' defences=''
backdoored_encoder='' label='' dry_run=0 augment=auto
ALL_DEFENCES=ft,fp,nad,clp,anp,kd,invert

die() { echo "run_pipeline.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "option $1 needs a value"
  case "$1" in
    --run_dir) run_dir=$2 ;;                 --pretraining_dataset) pretraining=$2 ;;
    --downstream_dataset) downstream=$2 ;;   --reference_file) reference=$2 ;;
    --trigger_file) trigger=$2 ;;            --clean_epochs) clean_epochs=$2 ;;
    --badencoder_epochs) bad_epochs=$2 ;;    --mimic_epochs) mimic_epochs=$2 ;;
    --mi_epochs) mi_epochs=$2 ;;             --nn_epochs) nn_epochs=$2 ;;
    --ratio) ratio=$2 ;;                     --mimic_lr) mimic_lr=$2 ;;
    --arch) arch=$2 ;;                       --width) width=$2 ;;
    --device) device=$2 ;;                   --data_root) data_root=$2 ;;
    --num_workers) num_workers=$2 ;;         --seed) seed=$2 ;;
    --save_freq) save_freq=$2 ;;             --clean_encoder) clean_encoder=$2 ;;
    --clean_args) clean_args=$2 ;;           --badencoder_args) bad_args=$2 ;;
    --mimic_args) mimic_args=$2 ;;           --eval_args) eval_args=$2 ;;
    --defences) defences=$2 ;;               --defence_args) defence_args=$2 ;;
    --attack) attack=$2 ;;                   --target_class) target_class=$2 ;;
    --poison_rate) poison_rate=$2 ;;         --backdoored_encoder) backdoored_encoder=$2 ;;
    --label) label=$2 ;;                     --dry_run) dry_run=$2 ;;
    --augment) augment=$2 ;;
    *) die "unknown option $1 (see the header of $0)" ;;
  esac
  shift 2
done
[ -n "$run_dir" ] || die "--run_dir is required"
[[ "$augment" =~ ^(auto|pil|tensor)$ ]] || die "--augment: expected auto, pil or tensor, got '$augment'"
case "$attack" in
  badencoder) bad_epochs=${bad_epochs:-200} ;;
  drupe) bad_epochs=${bad_epochs:-120} ;;
  ctrl) bad_epochs=${bad_epochs:-$clean_epochs} downstream=$pretraining ;;  # stage 0 on poisoned data, on its classes
  *) die "--attack: expected badencoder, drupe or ctrl, got '$attack'" ;;
esac
if [ "$attack" != ctrl ]; then
  [ -n "$reference" ] || die "--reference_file is required (e.g. reference/cifar10/priority.npz)"
fi
if [ "$dry_run" = 0 ]; then  # a dry run may list the commands of a run whose inputs later steps make
  [ -z "$reference" ] || [ -f "$reference" ] || die "--reference_file $reference: no such file"
  [ -f "$trigger" ] || die "--trigger_file $trigger: no such file"
  [ -z "$clean_encoder" ] || [ -f "$clean_encoder" ] || die "--clean_encoder $clean_encoder: no such file"
  [ -z "$backdoored_encoder" ] || [ -f "$backdoored_encoder" ] || \
    die "--backdoored_encoder $backdoored_encoder: no such file"
fi
[ "$defences" != all ] || defences=$ALL_DEFENCES
IFS=, read -r -a defence_list <<< "$defences"
for d in "${defence_list[@]}"; do
  [[ ",$ALL_DEFENCES," == *",$d,"* ]] || die "--defences: unknown defence '$d' (expected some of $ALL_DEFENCES, or all)"
done

if [ "$attack" = ctrl ]; then
  target_label=$target_class
elif [ "$dry_run" != 0 ]; then
  target_label="<y[0] of $reference>"
else
  target_label=$("$PYTHON" -c "
import sys
from datasets import DataError, load_reference
try:
    print(load_reference(sys.argv[1]).target_label)
except DataError as error:
    sys.exit(f'run_pipeline.sh: --reference_file {error}')" "$reference") || exit 2
fi
reference_flags=()
[ -z "$reference" ] || reference_flags=(--reference_file "$reference")
common=(--device "$device" --data_root "$data_root" --num_workers "$num_workers" --seed "$seed")
training=("${common[@]}" --augment "$augment")  # stages 0-2 and the defences (stage 3 does not augment)
if [ "$dry_run" != 0 ]; then
  echo "== run $run_dir${label:+ ($label)}"
else
mkdir -p "$run_dir"
cat > "$run_dir/run.json" <<JSON
{"pretraining_dataset": "$pretraining", "downstream_dataset": "$downstream", "target_label": $target_label,
 "attack": "$attack", "poison_rate": $poison_rate,
 "reference_file": "$reference", "trigger_file": "$trigger", "arch": "$arch", "width": $width,
 "clean_epochs": $clean_epochs, "badencoder_epochs": $bad_epochs, "mimic_epochs": $mimic_epochs,
 "mi_epochs": $mi_epochs, "nn_epochs": $nn_epochs, "ratio": $ratio, "mimic_lr": $mimic_lr, "seed": $seed,
 "defences": "$defences", "label": "$label", "backdoored_encoder": "$backdoored_encoder", "augment": "$augment"}
JSON
fi

# stage NAME DIR FINAL_FILE CHECKPOINT_GLOB command...: skip when FINAL_FILE exists, resume when the
# folder holds earlier checkpoints, otherwise start; what the stage prints goes to RUN/NAME.log too.
stage() {
  local name=$1 dir=$2 final=$3 glob=$4; shift 4
  if [ "$dry_run" != 0 ]; then
    echo "$PYTHON $*"; return 0
  fi
  if [ -f "$dir/$final" ]; then
    echo "== $name: done ($dir/$final), skipped"; return 0
  fi
  local resume=()
  if compgen -G "$dir/$glob" > /dev/null; then resume=(--resume); fi
  echo "== $name: $* ${resume[*]}"
  local started=$SECONDS
  # The terminal gets everything as printed; the log keeps what the terminal finally shows of each line
  # (progress bars redraw themselves with \r: only their last state stays, and the JSON lines stay clean).
  "$PYTHON" -u "$@" "${resume[@]}" 2>&1 | { tee /dev/fd/3 | sed -u 's/.*\r//' >> "$run_dir/$name.log"; } 3>&1
  [ -f "$dir/$final" ] || die "$name did not produce $dir/$final (see $run_dir/$name.log)"
  local spent=$(( SECONDS - started )) before=0
  [ ! -f "$dir/stage_seconds.txt" ] || before=$(cat "$dir/stage_seconds.txt")
  echo $(( before + spent )) > "$dir/stage_seconds.txt"
}

if [ -z "$clean_encoder" ]; then
  # shellcheck disable=SC2086  # the *_args strings are split into flags on purpose
  stage clean "$run_dir/clean" "model_$clean_epochs.pth" 'model_*.pth' \
    train_clean_encoder.py --pretraining_dataset "$pretraining" --arch "$arch" --width "$width" \
    --epochs "$clean_epochs" --save_freq "$save_freq" --results_dir "$run_dir/clean" "${training[@]}" $clean_args
  clean_encoder=$run_dir/clean/model_$clean_epochs.pth
fi

if [ -n "$backdoored_encoder" ]; then
  echo "== backdoor: given, $backdoored_encoder"
elif [ "$attack" = ctrl ]; then
  # Data poisoning: a poisoned copy of the pre-training split, then plain SimCLR on it (CTRL's recipe).
  poisoned=$run_dir/poisoned_data
  if [ "$dry_run" != 0 ]; then
    echo "$PYTHON -m datasets.poison --dataset $pretraining --data_root $data_root --trigger_file $trigger" \
      "--target_class $target_class --poison_rate $poison_rate --seed $seed --out $poisoned --overwrite"
  elif [ ! -f "$poisoned/poison.json" ]; then
    echo "== poison: $poison_rate of $pretraining, class $target_class, with $trigger"
    "$PYTHON" -m datasets.poison --dataset "$pretraining" --data_root "$data_root" --trigger_file "$trigger" \
      --target_class "$target_class" --poison_rate "$poison_rate" --seed "$seed" --out "$poisoned" --overwrite
  fi
  # shellcheck disable=SC2086
  stage backdoor "$run_dir/backdoor" "model_$bad_epochs.pth" 'model_*.pth' \
    train_clean_encoder.py --pretraining_dataset "$pretraining" --data_dir "$poisoned" --arch "$arch" \
    --width "$width" --epochs "$bad_epochs" --save_freq "$save_freq" --results_dir "$run_dir/backdoor" \
    "${training[@]}" $clean_args $bad_args
else
  # shellcheck disable=SC2086
  stage backdoor "$run_dir/backdoor" "model_$bad_epochs.pth" 'model_*.pth' \
    train_badencoder.py --attack "$attack" --pretraining_dataset "$pretraining" --shadow_dataset "$pretraining" \
    --encoder_usage_info "$pretraining" --downstreamTask "$downstream" --pretrained_encoder "$clean_encoder" \
    --reference_file "$reference" --trigger_file "$trigger" --epochs "$bad_epochs" \
    --results_dir "$run_dir/backdoor" "${training[@]}" $bad_args
fi
backdoored_encoder=${backdoored_encoder:-$run_dir/backdoor/model_$bad_epochs.pth}  # given, or stage 1's (ctrl: 0's)

# shellcheck disable=SC2086
stage mimic "$run_dir/mimic" "model$mimic_epochs.pth" 'model[0-9]*.pth' \
  MIMIC.py --pretraining_dataset "$pretraining" --teacher "$backdoored_encoder" --ratio "$ratio" \
  --lr "$mimic_lr" --epochs "$mimic_epochs" --mi_epochs "$mi_epochs" --save_freq "$save_freq" \
  --results_dir "$run_dir/mimic" "${training[@]}" $mimic_args
mimic_encoder=$run_dir/mimic/model$mimic_epochs.pth

# The baseline defences on the same backdoored encoder and clean subset as MIMIC.
encoders=("clean:$clean_encoder" "backdoored:$backdoored_encoder" "mimic:$mimic_encoder")
for d in "${defence_list[@]}"; do
  # shellcheck disable=SC2086
  stage "defence_$d" "$run_dir/defence_$d" defence.json '*_[0-9]*.pth' \
    baseline_defence.py --defence "$d" --pretraining_dataset "$pretraining" --teacher "$backdoored_encoder" \
    --ratio "$ratio" --epochs "$mimic_epochs" --save_freq "$save_freq" --results_dir "$run_dir/defence_$d" \
    "${training[@]}" $defence_args
  if [ "$dry_run" != 0 ]; then
    checkpoint='<defence.json: checkpoint>'
  else
    checkpoint=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['checkpoint'])" \
      "$run_dir/defence_$d/defence.json")
  fi
  encoders+=("$d:$run_dir/defence_$d/$checkpoint")
done

# an evaluation is redone (from scratch: it is the cheapest stage, and its encoder may have been retrained)
# when it has no metrics.json, or one that belongs to another encoder file or probe length
fresh_metrics() {  # metrics.json encoder nn_epochs
  "$PYTHON" -c "
import json, sys
m = json.load(open(sys.argv[1]))
sys.exit(0 if m.get('encoder') == sys.argv[2] and int(m.get('epoch', -1)) == int(sys.argv[3]) else 1)" "$@"
}
for pair in "${encoders[@]}"; do
  name=${pair%%:*} encoder=${pair#*:}
  metrics=$run_dir/eval_$name/metrics.json
  if [ "$dry_run" = 0 ] && [ -f "$metrics" ] && ! fresh_metrics "$metrics" "$encoder" "$nn_epochs"; then
    echo "== eval_$name: $metrics is for another encoder or probe length, evaluating again"
    rm "$metrics"
  fi
  # shellcheck disable=SC2086
  stage "eval_$name" "$run_dir/eval_$name" metrics.json 'no-checkpoints' \
    training_downstream_classifier.py --dataset "$downstream" --encoder_usage_info "$pretraining" \
    --encoder "$encoder" --trigger_file "$trigger" "${reference_flags[@]}" \
    --reference_label "$target_label" --nn_epochs "$nn_epochs" --results_dir "$run_dir/eval_$name" \
    --overwrite "${common[@]}" $eval_args
done

if [ "$dry_run" != 0 ]; then
  echo "$PYTHON scripts/results_table.py $run_dir --out $run_dir/table --summary $run_dir/summary.json"
else
  "$PYTHON" scripts/results_table.py "$run_dir" --out "$run_dir/table" --summary "$run_dir/summary.json"
fi
