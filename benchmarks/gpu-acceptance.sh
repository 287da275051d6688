#!/usr/bin/env bash
# Acceptance run for a new NVIDIA GPU host: install offline, test, segment real photos with every
# decoder, score the masks, benchmark, and leave every result under OUT_DIR.
#
#   benchmarks/gpu-acceptance.sh OUT_DIR
#   benchmarks/gpu-acceptance.sh --plan [CARVANA_DIR]   the phases, their calls and device minutes, here
#
# Run it from the repository root on a CUDA 13 host with Python >= 3.11 (torch optional: the
# torch baselines and random-weight exports need it). Inputs, all overridable by variables:
#   PHASE   A, B or C: one phase of a run cut to fit short leases (`--plan` and benchmarks/README.md,
#           "Acceptance run on a new GPU host"); it sets STAGES and what is required   [none: all]
#   WHEELS  folder of wheels to install offline: the joined parts of `stage-gpu-wheels` (it holds
#           install.sh and SHA256SUMS), or any folder of .whl files      [/tmp/gpu-wheels]
#   PHOTOS  folder of real Carvana JPEGs (>= 1,000 for the agreement check)  [/tmp/carvana/photos]
#   TRUTH   their ground-truth masks (Kaggle's <id>_mask.gif), at least for the validation cars
#                                                                          [/tmp/carvana/truth]
#   REFERENCE  the CPU's masks of the validation photos, made beforehand (gpu-pack.sh --phase):
#           cpu/ and cpu-tta/                                              [/tmp/carvana]
#   STAGES  which steps to run, comma-separated                            [all of them, in order]
#           install, test, segment, bench, classic; the phases' own: cuda-check, test-gpu,
#           test-dali, test-all, val-pillow, val-dali, throughput-pillow, throughput-dali, peer
#   DEVICE  the GPU                                                        [cuda]
#   AGREEMENT_MODEL  the one model every segment step runs, on every device, so that only decoding
#           and the provider differ (the CPU's default is INT8, a GPU's is not)  [batch/models/default.onnx]
#   COPIES  hard-linked copies of PHOTOS the throughput steps segment       [4096]
#   ARCHIVE a .tgz that OUT_DIR is packed into after every step (a device call's $OUT/x.tgz: what a
#           command killed at its limit leaves is still returned)          [none]
#   SITE    where the wheels are installed (put first on PYTHONPATH)       [/tmp/gpu-site]
#   WORK    masks and other bulky intermediate files (not results)         [/tmp/unet-acceptance]
#
# Each step's log and results land in OUT_DIR; summary.md gathers the figures and the verdict of
# every target (docs: benchmarks/README.md, "Acceptance run on a new GPU host"). A failed step is
# recorded and the next one still runs; the exit status is 1 if any step failed.
set -uo pipefail

if [ "${1:-}" = "--plan" ]; then
  exec "${PYTHON:-python3}" "$(dirname "$0")/../scripts/gpu_acceptance_plan.py" "${@:2}"
fi
out=${1:?usage: benchmarks/gpu-acceptance.sh OUT_DIR | --plan [CARVANA_DIR]}
PHASE=${PHASE:-}
case $PHASE in  # each phase installs what it needs; DALI is required where the phase tests it
  A) phase_stages=install,cuda-check,test-gpu,val-pillow,throughput-pillow,peer REQUIRE_DALI=0 ;;
  B) phase_stages=install,test-dali,val-dali,throughput-dali REQUIRE_DALI=1 ;;
  C) phase_stages=install,test-all,bench,classic REQUIRE_DALI=1 ;;
  "") phase_stages=install,test,segment,bench,classic REQUIRE_DALI=1 ;;
  *) echo "gpu-acceptance: PHASE is A, B or C, not '$PHASE'" >&2; exit 2 ;;
esac
WHEELS=${WHEELS:-/tmp/gpu-wheels}
PHOTOS=${PHOTOS:-/tmp/carvana/photos}
TRUTH=${TRUTH:-/tmp/carvana/truth}
REFERENCE=${REFERENCE:-/tmp/carvana}
STAGES=${STAGES:-$phase_stages}
DEVICE=${DEVICE:-cuda}
AGREEMENT_MODEL=${AGREEMENT_MODEL:-batch/models/default.onnx}
COPIES=${COPIES:-4096}
ARCHIVE=${ARCHIVE:-}
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
  archive
  return "$rc"
}
# archive: OUT_DIR as it is now, into ARCHIVE (replaced whole, so a reader never sees half of it).
archive() {
  [ -n "$ARCHIVE" ] || return 0
  tar -czf "$ARCHIVE.partial" -C "$out" . && mv -f "$ARCHIVE.partial" "$ARCHIVE"
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
  "$PYTHON" - "$DEVICE" "$REQUIRE_DALI" <<'PY'
import sys
import onnxruntime as ort
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, "from", ort.__file__)
print("providers", providers)
if "CUDAExecutionProvider" not in providers:
    sys.exit("onnxruntime has no CUDA provider: the onnxruntime-gpu wheel did not take the place of onnxruntime")
if sys.argv[2] == "1":
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
  local model=(--model "$AGREEMENT_MODEL")
  step segment-val-cpu segment_and_score val-cpu "$val" --device cpu --decoder pillow "${model[@]}"
  step segment-val-dali segment_and_score val-dali "$val" --device "$DEVICE" --decoder dali "${model[@]}"
  step segment-val-dali-tta segment_and_score val-dali-tta "$val" --device "$DEVICE" --decoder dali --tta "${model[@]}"
  step segment-val-cpu-tta segment_and_score val-cpu-tta "$val" --device cpu --decoder pillow --tta "${model[@]}"
  for name in val-cpu val-dali val-dali-tta val-cpu-tta; do
    step "truth-$name" truth_score "$name"
  done
}

# The phases' checks (PHASE=A|B|C): the validation photos with the CPU's masks made beforehand (REFERENCE).

# val_on_gpu DECODER: the validation photos on the GPU, plain and with --tta, scored against the CPU's
# masks and the truth; the CPU's masks scored against the truth too.
val_on_gpu() {
  local decoder=$1 name=val-gpu-$1
  [ "$decoder" = dali ] && name=val-dali
  for tta in "" -tta; do
    step "segment-$name$tta" segment_and_score "$name$tta" "$PHOTOS" --device "$DEVICE" --decoder "$decoder" \
      --model "$AGREEMENT_MODEL" ${tta:+--tta}
    step "agreement-$name$tta" unet-batch evaluate "$WORK/$name$tta" "$REFERENCE/cpu$tta" --csv "$out/agreement-$name$tta-vs-val-cpu$tta.csv"
    step "truth-$name$tta" truth_score "$name$tta"
    [ -f "$out/truth-val-cpu$tta.csv" ] ||
      step "truth-val-cpu$tta" unet-batch evaluate "$REFERENCE/cpu$tta" "$TRUTH" --csv "$out/truth-val-cpu$tta.csv"
  done
}

# throughput DECODER: COPIES hard-linked copies of PHOTOS segmented on the GPU; its report has the stage times.
throughput() {
  local copies="$WORK/copies" i=0
  compgen -G "$PHOTOS/*.jpg" >/dev/null || { echo "no JPEGs in $PHOTOS to copy"; return 1; }
  if [ ! -d "$copies" ]; then
    rm -rf "$copies.partial" && mkdir -p "$copies.partial"
    while [ "$i" -lt "$COPIES" ]; do
      for photo in "$PHOTOS"/*.jpg; do
        [ "$i" -lt "$COPIES" ] && ln "$photo" "$copies.partial/$i-$(basename "$photo")" && i=$((i + 1))
      done
    done
    mv "$copies.partial" "$copies"
  fi
  segment_and_score "throughput-$1" "$copies" --device "$DEVICE" --decoder "$1" --model "$AGREEMENT_MODEL" \
    --workers "$(nproc)"
  rm -rf "${WORK:?}/throughput-$1"
}

# peer: the PyTorch peer (nvJPEG batches, FP16 channels-last, torch.compile) on the same photos; needs no wheel.
peer() {
  "$PYTHON" - "$WORK/copies" "$AGREEMENT_MODEL" "$out/peer.json" <<'PY'
import json, os, sys
from dataclasses import asdict
from pathlib import Path
from batch.core.devices import parse_device
from benchmarks.machine import Hardware
from benchmarks.models import read_model
from benchmarks.peers import run_torch_peer
photos = sorted(Path(sys.argv[1]).glob("*.jpg"))[:1024]
result = run_torch_peer(photos, read_model(sys.argv[2]), Hardware(parse_device("cuda:0"), None, os.cpu_count()), 32)
Path(sys.argv[3]).write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
print(result.status, result.reason or "", result.images_per_second)
sys.exit(0 if result.status == "ok" else 1)
PY
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
# --gpu-host: a gpu test that skips fails (a GPU that does not start must not pass as "skipped").
pytest_on() { "$PYTHON" -m pytest --gpu-host -ra -q -p no:cacheprovider --junitxml="$out/$1.xml" "${@:2}"; }
if wants test; then
  step pytest-gpu pytest_on pytest-gpu -m "gpu or dali"
  step pytest-rest pytest_on pytest-rest -m "not gpu and not dali"
fi
# The fresh-process check: onnxruntime-gpu's CUDA provider starts and runs a batch in a process without torch.
wants cuda-check && step cuda-check pytest_on cuda-check tests/test_batch_gpu.py -k fresh_process
wants test-gpu && step pytest-gpu pytest_on pytest-gpu -m "gpu and not dali"
wants test-dali && step pytest-dali pytest_on pytest-dali -m dali
wants test-all && step pytest-all pytest_on pytest-all
wants segment && run_segment_checks
wants val-pillow && val_on_gpu pillow
wants val-dali && val_on_gpu dali
wants throughput-pillow && step throughput-pillow throughput pillow
wants throughput-dali && step throughput-dali throughput dali
wants peer && step peer peer
wants bench && step bench-full bench_bundled bench-full
wants classic && step bench-classic bench bench-classic --suite classic --size 640x960 --width 64
step summary "$PYTHON" scripts/gpu_acceptance_verdict.py "$out"
cat "$out/summary.md" 2>/dev/null
archive
exit "$status"
