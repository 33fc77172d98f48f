#!/usr/bin/env bash
# One command that runs every GPU path of the pipeline at tiny scale and prints one PASS/FAIL line per check:
#
#   bash scripts/gpu_check.sh [OUT_DIR]     # default: a new folder under ${TMPDIR:-/tmp}; logs in OUT_DIR/logs/
#
#   - stages 0-3 and a baseline defence (nad) on CUDA: tensor augmentation on the device, channels_last;
#     stage 0 also with --amp, --compile and --deterministic;
#   - resume on CUDA: a run stopped after epoch 1 and resumed ends bit-identical to an uninterrupted one
#     (--deterministic), and its checkpoint carries the CUDA RNG states; a probe started on the CPU resumes on CUDA;
#   - torchrun with NCCL on all visible GPUs (2 or more): stages 0, 1, 2 and a defence (ft), one set of files each;
#     a step of stage 1 on N GPUs is the step of one GPU on the same global batch (max abs difference of the
#     parameters <= 1e-4: NCCL sums in its own order, cuDNN may pick other kernels for a smaller batch); a run of
#     N processes resumed with 1;
#   - a real-world encoder at 224 pixels (CLIP's RN50, random weights, in the released layout): MIMIC with --amp on
#     the tensor path from a folder of PNG images, the student written back in the teacher's layout, and the
#     suspect and the student probed in one run on a labelled image folder; benchmark.py --arch clip_rn50;
#   - scripts/benchmark.py --device cuda (its JSON line goes to OUT_DIR/benchmark.json; BENCHMARK_ARGS adds flags,
#     e.g. BENCHMARK_ARGS=--quick).
# Without CUDA it says so in one line and exits 0. Exit status 1 when a check failed. Data are the offline
# synthetic sets, made in OUT_DIR. GPU_CHECK_DEVICE=cpu runs the same checks on the CPU (torchrun with gloo on 2
# processes, --amp ignored, no --compile), which is how the script itself is checked on a machine without a
# GPU (by hand: the test suite does not run it, for its minutes). Every Python command starts $PYTHON (default: the
# `python` first on PATH; PYTHON=/path/to/venv/bin/python for a virtual environment that is not activated).
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;; esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
if [ "$DEVICE" = cuda ]; then
  GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) \
    || GPUS=0
  if [ "${GPUS:-0}" -lt 1 ]; then
    echo "gpu_check: no CUDA device visible to torch on this machine; nothing to check"
    exit 0
  fi
  NPROC=$GPUS
else
  NPROC=2
fi
OUT=${1:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT/logs"
export TQDM_DISABLE=1
failed=0

# check NAME COMMAND...: run COMMAND with its output in OUT/logs/NAME.log; one PASS/FAIL line.
check() {
  local name=$1; shift
  local log="$OUT/logs/$name.log" started=$SECONDS
  if "$@" > "$log" 2>&1; then
    printf 'PASS  %-34s %4ds\n' "$name" $(( SECONDS - started ))
  else
    failed=$(( failed + 1 ))
    printf 'FAIL  %-34s %4ds  %s (last line: %s)\n' "$name" $(( SECONDS - started )) "$log" \
      "$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c 1-160)"
  fi
}
skip() { printf 'SKIP  %-34s       %s\n' "$1" "$2"; }

torchrun_n() {  # torchrun_n N SCRIPT ARGS...: N processes of SCRIPT on this node
  local n=$1; shift
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$n" "$@" --dist_timeout 300
}

# equal_states A B TOLERANCE: the state_dicts of two checkpoints differ by at most TOLERANCE (0: bit-identical)
equal_states() {
  "$PYTHON" - "$@" <<'PY'
import sys
from models import load_checkpoint
a, b = (load_checkpoint(path)['state_dict'] for path in sys.argv[1:3])
assert a.keys() == b.keys(), 'different keys'
difference = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
print(f'max abs difference {difference:.3g}')
sys.exit(0 if difference <= float(sys.argv[3]) else 1)
PY
}

# files_are DIR NAME...: DIR holds exactly these files (one set: nothing twice, no temporary files)
files_are() {
  local dir=$1; shift
  local expected actual
  expected=$(printf '%s\n' "$@" | sort)
  actual=$(ls -A "$dir" | sort)
  [ "$expected" = "$actual" ] || { echo "expected: $expected"; echo "found: $actual"; return 1; }
}

# --- tiny offline inputs -------------------------------------------------------------------------------------
data=$OUT/data
if ! { "$PYTHON" -m datasets.prepare synthetic_shapes synthetic_digits --out "$data" \
         --sizes train=512,test=256 --seed 1 &&
       "$PYTHON" reference/make_reference.py --dataset synthetic_digits --data_root "$data" --class_id 1 \
         --first 1 --out "$OUT/reference_one.npz"; } > "$OUT/logs/data.log" 2>&1; then
  echo "FAIL  data                               $OUT/logs/data.log"; exit 1
fi
trigger=trigger/trigger_pt_white_21_10_ap_replace.npz
common=(--device "$DEVICE" --data_root "$data" --num_workers 2 --no_progress)
stage0=(train_clean_encoder.py --pretraining_dataset synthetic_shapes --width 8 --batch_size 64 --knn-k 20
        --augment tensor "${common[@]}")
stage1=(train_badencoder.py --pretraining_dataset synthetic_shapes --shadow_dataset synthetic_shapes
        --encoder_usage_info synthetic_shapes --downstreamTask synthetic_digits --trigger_file "$trigger"
        --reference_file "$OUT/reference_one.npz" --batch_size 64 --lr 0.01 --knn-k 20 --augment tensor "${common[@]}")
stage2=(--pretraining_dataset synthetic_shapes --ratio 0.25 --batch_size 32 --augment tensor "${common[@]}")
stage3=(training_downstream_classifier.py --dataset synthetic_digits --encoder_usage_info synthetic_shapes
        --encoder "$OUT/mimic/model2.pth" --trigger_file "$trigger" --reference_file "$OUT/reference_one.npz"
        --reference_label 1 --data_root "$data" --num_workers 2 --no_progress)  # no --device: see probe_resume_check
echo "gpu_check: device $DEVICE, $NPROC process(es) for torchrun; logs in $OUT/logs"

# --- one device -----------------------------------------------------------------------------------------------
check stage0 "$PYTHON" "${stage0[@]}" --epochs 2 --save_freq 1 --results_dir "$OUT/stage0"
clean=$OUT/stage0/model_2.pth
check stage0_amp "$PYTHON" "${stage0[@]}" --epochs 1 --amp --results_dir "$OUT/stage0_amp"
if [ "$DEVICE" = cuda ]; then
  check stage0_compile "$PYTHON" "${stage0[@]}" --epochs 1 --compile --results_dir "$OUT/stage0_compile"
else
  skip stage0_compile "--compile is checked on CUDA only"
fi
check stage0_deterministic "$PYTHON" "${stage0[@]}" --epochs 2 --deterministic --results_dir "$OUT/stage0_det"
resume_check() {
  "$PYTHON" "${stage0[@]}" --epochs 1 --deterministic --results_dir "$OUT/stage0_resumed" &&
  "$PYTHON" "${stage0[@]}" --epochs 2 --deterministic --resume --results_dir "$OUT/stage0_resumed" &&
  equal_states "$OUT/stage0_det/model_2.pth" "$OUT/stage0_resumed/model_2.pth" 0 &&
  "$PYTHON" -c "
import sys, torch
from models import load_checkpoint
rng = load_checkpoint(sys.argv[1])['rng']
assert not torch.cuda.is_available() or len(rng['cuda']) == torch.cuda.device_count(), 'no CUDA RNG states'
print('RNG states:', sorted(rng))" "$OUT/stage0_resumed/model_1.pth"
}
check resume_bit_identical resume_check
check stage1 "$PYTHON" "${stage1[@]}" --pretrained_encoder "$clean" --epochs 1 --results_dir "$OUT/stage1"
backdoored=$OUT/stage1/model_1.pth
check stage2_mimic "$PYTHON" MIMIC.py "${stage2[@]}" --teacher "$backdoored" --epochs 2 --mi_epochs 2 \
  --results_dir "$OUT/mimic"
check defence_nad "$PYTHON" baseline_defence.py --defence nad "${stage2[@]}" --teacher "$backdoored" --epochs 2 \
  --results_dir "$OUT/nad"
check stage3 "$PYTHON" "${stage3[@]}" --device "$DEVICE" --nn_epochs 2 --results_dir "$OUT/stage3"
probe_resume_check() {
  # a probe checkpoint written on the CPU (foreach Adam) resumes on the device (fused Adam on CUDA: its step state
  # must move to the GPU, common.runs.restore_optimizer)
  "$PYTHON" "${stage3[@]}" --device cpu --nn_epochs 1 --save_freq 1 --results_dir "$OUT/stage3_resumed" &&
  "$PYTHON" "${stage3[@]}" --device "$DEVICE" --nn_epochs 2 --save_freq 1 --resume --results_dir "$OUT/stage3_resumed"
}
check stage3_resume_from_cpu probe_resume_check
# three encoders probed in one run (models/probe_group.py: batched products, a dropout generator per probe)
check stage3_group "$PYTHON" "${stage3[@]}" --device "$DEVICE" --nn_epochs 3 --save_freq 1 \
  --encoder "$clean" "$backdoored" "$OUT/mimic/model2.pth" --names clean backdoored mimic --results_dir "$OUT/stage3_group"

# --- a real-world encoder at 224 pixels: CLIP RN50 (random weights) from image folders ---------------------------
clip_files() {  # the suspect in the released layout, 16 clean PNGs, a 2-class labelled task, a 224-px trigger
  "$PYTHON" - "$OUT/clip" <<'PY' &&
import sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from models.visual import ModifiedResNet
out, rng = Path(sys.argv[1]), np.random.default_rng(0)
def image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((256, 256, 3)) * 60 + value).astype(np.uint8)).save(path)
for k in range(16):
    image(out / 'clean' / f'{k}.png', 100)
for split, count in (('train', 8), ('test', 4)):
    for name, value in (('airplane', 20), ('truck', 170)):
        for k in range(count):
            image(out / 'task' / split / name / f'{k}.png', value)
torch.manual_seed(0)
torch.save({'state_dict': ModifiedResNet().state_dict()}, out / 'suspect.pth')
PY
  "$PYTHON" trigger/make_trigger.py --image_size 224 --row 173 --col 173 --size 50 --out "$OUT/clip/trigger.npz" &&
  "$PYTHON" reference/make_reference.py --dataset stl10 --data_dir "$OUT/clip/task" --class_id 1 --image_size 224 \
    --out "$OUT/clip/reference.npz"
}
check clip_files clip_files
check clip_mimic "$PYTHON" MIMIC.py --teacher "$OUT/clip/suspect.pth" --encoder_usage_info CLIP \
  --data_dir "$OUT/clip/clean" --ratio 1 --epochs 2 --mi_epochs 2 --batch_size 8 --amp --augment tensor \
  --device "$DEVICE" --num_workers 2 --no_progress --results_dir "$OUT/clip_mimic"
clip_student_loads() {  # the student in the released layout: the released code's CLIP(...).visual takes it strictly
  "$PYTHON" -c "
import sys, torch
from models.visual import ModifiedResNet
ModifiedResNet().load_state_dict(torch.load(sys.argv[1], weights_only=True)['state_dict'], strict=True)
print('strict load: ok')" "$OUT/clip_mimic/model2.pth"
}
check clip_student_loads clip_student_loads
check clip_stage3_group "$PYTHON" training_downstream_classifier.py --encoder_usage_info CLIP --dataset stl10 \
  --data_dir "$OUT/clip/task" --encoder "$OUT/clip/suspect.pth" "$OUT/clip_mimic/model2.pth" \
  --names suspect mimic --trigger_file "$OUT/clip/trigger.npz" --reference_file "$OUT/clip/reference.npz" \
  --reference_label 1 --nn_epochs 3 --device "$DEVICE" --no_progress --results_dir "$OUT/clip_stage3"

# --- torchrun on every visible GPU ------------------------------------------------------------------------------
if [ "$NPROC" -lt 2 ]; then
  skip torchrun "one CUDA device: NCCL needs 2 or more GPUs (one process per GPU)"
else
  backend=$([ "$DEVICE" = cuda ] && echo nccl || echo gloo)
  batch=$(( 32 * NPROC ))  # the global batch, an equal share per process
  run_stage0_n() {
    torchrun_n "$NPROC" "${stage0[@]}" --batch_size "$batch" --epochs 2 --save_freq 1 \
      --results_dir "$OUT/torchrun_stage0" &&
    files_are "$OUT/torchrun_stage0" args.json log.csv model_1.pth model_2.pth
  }
  check "torchrun_${backend}_stage0" run_stage0_n
  # One step: over many steps BadEncoder amplifies rounding differences (between two single-process runs with
  # different thread counts as much as between 1 and N processes), so only a step compares like with like.
  one_step="--epochs 1 --batch_size $batch --shadow_fraction $("$PYTHON" -c "print($batch / 512)") --deterministic"
  run_stage1_n() {
    # shellcheck disable=SC2086
    "$PYTHON" "${stage1[@]}" --pretrained_encoder "$clean" $one_step --results_dir "$OUT/stage1_one" &&
    # shellcheck disable=SC2086
    torchrun_n "$NPROC" "${stage1[@]}" --pretrained_encoder "$clean" $one_step --results_dir "$OUT/torchrun_stage1" &&
    files_are "$OUT/torchrun_stage1" args.json log.csv model_1.pth &&
    equal_states "$OUT/stage1_one/model_1.pth" "$OUT/torchrun_stage1/model_1.pth" 1e-4
  }
  check "torchrun_${backend}_stage1_equals_one" run_stage1_n
  run_mimic_n() {
    torchrun_n "$NPROC" MIMIC.py "${stage2[@]}" --batch_size "$batch" --teacher "$backdoored" --epochs 2 \
      --mi_epochs 2 --results_dir "$OUT/torchrun_mimic" &&
    files_are "$OUT/torchrun_mimic" args.json mi.json log.csv model2.pth
  }
  check "torchrun_${backend}_mimic" run_mimic_n
  run_defence_n() {
    torchrun_n "$NPROC" baseline_defence.py --defence ft "${stage2[@]}" --batch_size "$batch" \
      --teacher "$backdoored" --epochs 2 --results_dir "$OUT/torchrun_ft" &&
    files_are "$OUT/torchrun_ft" args.json defence.json log.csv model_2.pth
  }
  check "torchrun_${backend}_defence_ft" run_defence_n
  run_resume_n() {
    torchrun_n "$NPROC" "${stage0[@]}" --batch_size "$batch" --epochs 1 --results_dir "$OUT/torchrun_resumed" &&
    "$PYTHON" "${stage0[@]}" --batch_size "$batch" --epochs 2 --resume --results_dir "$OUT/torchrun_resumed" &&
    files_are "$OUT/torchrun_resumed" args.json log.csv model_1.pth model_2.pth
  }
  check "torchrun_${backend}_resume_with_1" run_resume_n
fi

# --- the benchmark ----------------------------------------------------------------------------------------------
benchmark() {
  # shellcheck disable=SC2086  # BENCHMARK_ARGS is split into flags on purpose
  "$PYTHON" scripts/benchmark.py --device "$DEVICE" ${BENCHMARK_ARGS:-} > "$OUT/benchmark.json" &&
  "$PYTHON" -c "import json, sys; json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])" "$OUT/benchmark.json"
}
check "benchmark_$DEVICE" benchmark
benchmark_clip() {  # the real-world family's feature pass and MIMIC step (224 px; --quick: batch 2 on the CPU)
  local flags=(--arch clip_rn50 --device "$DEVICE")
  if [ "$DEVICE" = cuda ]; then flags+=(--amp); else flags+=(--quick); fi
  "$PYTHON" scripts/benchmark.py "${flags[@]}" > "$OUT/benchmark_clip_rn50.json" &&
  "$PYTHON" -c "import json, sys; json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])" \
    "$OUT/benchmark_clip_rn50.json"
}
check "benchmark_clip_rn50_$DEVICE" benchmark_clip

if [ "$failed" -gt 0 ]; then
  echo "gpu_check: $failed check(s) failed; logs in $OUT/logs"
  exit 1
fi
echo "gpu_check: every check passed; logs in $OUT/logs"
