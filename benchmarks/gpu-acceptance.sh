#!/usr/bin/env bash
# Acceptance run for a new NVIDIA GPU host: install offline, test, segment real photos with every
# decoder, score the masks, benchmark, and leave every result under OUT_DIR.
#
#   benchmarks/gpu-acceptance.sh OUT_DIR
#
# Run it from the repository root on a CUDA 13 host with Python >= 3.11 (torch optional: the
# torch baselines and random-weight exports need it). Inputs, all overridable by variables:
#   WHEELS  folder of wheels to install offline: the joined parts of `stage-gpu-wheels` (it holds
#           install.sh and SHA256SUMS), or any folder of .whl files      [/tmp/gpu-wheels]
#   PHOTOS  folder of real Carvana JPEGs (>= 1,000 for the agreement check)  [/tmp/carvana/photos]
#   TRUTH   their ground-truth masks (Kaggle's <id>_mask.gif), at least for the validation cars
#                                                                          [/tmp/carvana/truth]
#   STAGES  which steps to run, comma-separated                            [all of them, in order]
#           install, test, segment, bench, classic
#   DEVICE  the GPU                                                        [cuda]
#   AGREEMENT_MODEL  the one model every path of the agreement check runs, so that only decoding
#           and the provider differ (the CPU default is INT8, a GPU's is not)  [batch/models/default.onnx]
#   SITE    where the wheels are installed (put first on PYTHONPATH)       [/tmp/gpu-site]
#   WORK    masks and other bulky intermediate files (not results)         [/tmp/unet-acceptance]
#
# Each step's log and results land in OUT_DIR; summary.md gathers the figures and the verdict of
# every target (docs: benchmarks/README.md, "Acceptance run on a new GPU host"). A failed step is
# recorded and the next one still runs; the exit status is 1 if any step failed.
set -uo pipefail

out=${1:?usage: benchmarks/gpu-acceptance.sh OUT_DIR}
WHEELS=${WHEELS:-/tmp/gpu-wheels}
PHOTOS=${PHOTOS:-/tmp/carvana/photos}
TRUTH=${TRUTH:-/tmp/carvana/truth}
STAGES=${STAGES:-install,test,segment,bench,classic}
DEVICE=${DEVICE:-cuda}
AGREEMENT_MODEL=${AGREEMENT_MODEL:-batch/models/default.onnx}
SITE=${SITE:-/tmp/gpu-site}
WORK=${WORK:-/tmp/unet-acceptance}
PYTHON=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" "$WORK"
out=$(cd "$out" && pwd)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$repo" || exit 2

status=0
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$out/steps.log" >&2; }
wants() { [[ ",$STAGES," == *",$1,"* ]]; }
# step NAME COMMAND...: run a command with its output in OUT_DIR/NAME.log; record how it ended.
step() {
  local name=$1 start=$SECONDS rc
  shift
  log "start $name: $*"
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  log "end $name: exit $rc after $((SECONDS - start)) s"
  echo "$name $rc $((SECONDS - start))" >>"$out/steps.tsv"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

describe_machine() {
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "repository: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  nvidia-smi 2>&1 | sed -n '1,4p'
  echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
  "$PYTHON" - <<'PY'
import importlib.metadata as md, platform
print("python", platform.python_version())
for name in ("onnxruntime-gpu", "onnxruntime", "nvidia-dali-cuda130", "torch", "torchvision", "onnx", "numpy", "pillow", "carvana-unet"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
PY
}

install_offline() {
  if [ -f "$WHEELS/install.sh" ]; then
    bash "$WHEELS/install.sh" "$WHEELS" "$SITE" || return 1
  elif compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl || return 1
  else
    echo "no wheels in $WHEELS: stage them with ../shared/tools/stage-gpu-wheels (see benchmarks/README.md)"
    return 1
  fi
  # The project itself, editable, without its dependencies (they are the host's or in $SITE).
  "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
  check_gpu_stack
}

check_gpu_stack() {
  "$PYTHON" - "$DEVICE" <<'PY'
import sys
import onnxruntime as ort
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("providers", providers)
if "CUDAExecutionProvider" not in providers:
    sys.exit("onnxruntime has no CUDA provider: the onnxruntime-gpu wheel did not take the place of onnxruntime")
import nvidia.dali
print("DALI", nvidia.dali.__version__)
PY
}

# segment_and_score NAME PHOTOS [OPTIONS...]: masks into WORK/NAME, report and scores into OUT_DIR.
segment_and_score() {
  local name=$1 photos=$2
  shift 2
  rm -rf "${WORK:?}/$name"
  unet-batch segment "$photos" "$WORK/$name" --no-progress "$@" || return 1
  cp "$WORK/$name/report.json" "$out/$name.report.json"
}

# agreement A B: mean Dice of the masks in WORK/A against those in WORK/B (B as the reference).
agreement() {
  unet-batch evaluate "$WORK/$1" "$WORK/$2" --csv "$out/agreement-$1-vs-$2.csv"
}

# truth_score NAME: Dice of WORK/NAME's validation-car masks against the ground truth.
truth_score() {
  unet-batch evaluate "$WORK/$1" "$TRUTH" --csv "$out/truth-$1.csv"
}

# The validation cars of the bundled model (never trained on), as a folder of links into PHOTOS.
validation_photos() {
  local cars folder="$WORK/val-photos"
  rm -rf "$folder" && mkdir -p "$folder"
  cars=$("$PYTHON" -c "import json; print(' '.join(json.load(open('checkpoints/w16-320x480/config.json'))['val_images']))")
  for name in $cars; do
    for photo in "$PHOTOS/$name".jpg "$PHOTOS/$name"; do
      [ -f "$photo" ] && ln -sf "$photo" "$folder/" && break
    done
  done
  echo "$folder"
}

run_segment_checks() {
  local val
  val=$(validation_photos)
  log "validation photos present: $(find "$val" -name '*.jpg' | wc -l)"
  step segment-cpu-pillow segment_and_score cpu-pillow "$PHOTOS" --device cpu --decoder pillow --model "$AGREEMENT_MODEL"
  step segment-gpu-dali segment_and_score gpu-dali "$PHOTOS" --device "$DEVICE" --decoder dali --model "$AGREEMENT_MODEL"
  step segment-gpu-pillow segment_and_score gpu-pillow "$PHOTOS" --device "$DEVICE" --decoder pillow --model "$AGREEMENT_MODEL"
  step agreement-dali agreement gpu-dali cpu-pillow
  step agreement-gpu-pillow agreement gpu-pillow cpu-pillow
  step segment-val-cpu segment_and_score val-cpu "$val" --device cpu --decoder pillow
  step segment-val-dali segment_and_score val-dali "$val" --device "$DEVICE" --decoder dali
  step segment-val-dali-tta segment_and_score val-dali-tta "$val" --device "$DEVICE" --decoder dali --tta
  step segment-val-cpu-tta segment_and_score val-cpu-tta "$val" --device cpu --decoder pillow --tta
  for name in val-cpu val-dali val-dali-tta val-cpu-tta; do
    step "truth-$name" truth_score "$name"
  done
}

bench() {
  local name=$1
  shift
  unet-bench run --device "$DEVICE" --images "$PHOTOS" --out "$out/$name" --overwrite "$@"
}

# bench_bundled NAME: the full suite with the bundled model's weights (its checkpoint, at its input size).
bench_bundled() {
  local source
  source=$("$PYTHON" -c "from benchmarks.models import bundled_source; c, s = bundled_source(); print(c, f'{s[0]}x{s[1]}')") || return 1
  read -r checkpoint size <<<"$source"
  bench "$1" --suite full --model "$checkpoint" --size "$size"
}

log "acceptance run: stages $STAGES, results in $out"
describe_machine >"$out/machine.txt" 2>&1
wants install && step install install_offline
describe_machine >"$out/machine.txt" 2>&1  # again, with what was installed
if wants test; then
  step pytest-gpu "$PYTHON" -m pytest -m "gpu or dali" -ra -q --junitxml="$out/pytest-gpu.xml"
  step pytest-rest "$PYTHON" -m pytest -m "not gpu and not dali" -ra -q -p no:cacheprovider --junitxml="$out/pytest-rest.xml"
fi
wants segment && run_segment_checks
wants bench && step bench-full bench_bundled bench-full
wants classic && step bench-classic bench bench-classic --suite classic --size 640x960 --width 64
step summary "$PYTHON" scripts/gpu_acceptance_verdict.py "$out"
cat "$out/summary.md" 2>/dev/null
exit "$status"
