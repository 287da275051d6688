#!/usr/bin/env bash
# Pack what a GPU acceptance run needs into parts that fit a transfer limit, on a machine with
# network access; on the GPU host, unpack the parts into /tmp and run benchmarks/gpu-acceptance.sh.
#
#   benchmarks/gpu-pack.sh [CARVANA_DIR] [PHOTOS] [LIMIT_MIB] [MASKS]
#   benchmarks/gpu-pack.sh --phase A|B|C [CARVANA_DIR] [LIMIT_MIB]
#       --phase      one phase of the acceptance run (`benchmarks/gpu-acceptance.sh --plan`), into
#                    .gpu-payload/P/part-NN: A: onnxruntime-gpu and the validation photos at half
#                    size; B: onnxruntime-gpu, DALI and the validation photos as shot; C: both wheels.
#                    A and B carry the CPU's masks of their photos (cpu/, cpu-tta/), made here with
#                    batch/models/default.onnx, the model the GPU runs there (PYTHON: the project's)
#       CARVANA_DIR  Kaggle layout (train/, train_masks/)                [../shared/data/carvana]
#       PHOTOS       how many photos: every validation photo of the bundled model, then others  [1024]
#       LIMIT_MIB    what one transfer may carry, the repository included                         [64]
#       MASKS        whose masks go into truth/: val (the validation photos', to score them) or all
#                    (every packed photo's, to train on the GPU: PHOTOS=1600 MASKS=all)          [val]
#
# Writes .gpu-payload/part-NN/{wheels,photos}/ (add /.gpu-payload/ to .git/info/exclude): the wheels
# of onnxruntime-gpu and DALI (staged by ../shared/tools/stage-gpu-wheels, cut into pieces) and
# pieces of photos.tar (photos/ and the validation cars' masks in truth/), packed into as few parts
# as fit, each sized so that it and the repository's files stay under LIMIT_MIB. The list of parts
# and the command that unpacks one on the host are printed at the end (benchmarks/README.md,
# "Acceptance run on a new GPU host").
set -euo pipefail
cd "$(dirname "$0")/.."
phase=""
if [ "${1:-}" = "--phase" ]; then
  phase=${2:-}
  case $phase in A | B | C) ;; *) echo "gpu-pack: --phase is A, B or C, not '$phase'" >&2; exit 2 ;; esac
  shift 2
  carvana=${1:-../shared/data/carvana} photos=0 limit_mib=${2:-64} masks=val
else
  carvana=${1:-../shared/data/carvana} photos=${2:-1024} limit_mib=${3:-64} masks=${4:-val}
fi
case $masks in val | all) ;; *) echo "gpu-pack: MASKS is val or all, not '$masks'" >&2; exit 2 ;; esac
payload=.gpu-payload${phase:+/$phase}
stage=${STAGE_WHEELS:-../shared/tools/stage-gpu-wheels}  # overridable (tests)
PYTHON=${PYTHON:-python3}
# DALI's own pins (its Requires-Dist): libcst~=1.8, which the stage tool's default list leaves unpinned.
export DALI_NEEDS=${DALI_NEEDS:-"nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.0.4.44 nvtx makefun optree astunparse gast libcst~=1.8"}

tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
part_mib=$((limit_mib - tree_bytes / 1048576 - 3))
[ "$part_mib" -ge 8 ] || { echo "gpu-pack: the repository alone takes $((tree_bytes / 1048576)) MiB of the $limit_mib MiB limit" >&2; exit 2; }
echo "repository: $((tree_bytes / 1048576)) MiB; parts of at most $part_mib MiB" >&2

rm -rf "$payload" && mkdir -p "$payload"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# Wheels: stage-gpu-wheels cuts them into parts (part-00 holds install.sh and SHA256SUMS).
case $phase in A) wheels=ort ;; *) wheels=all ;; esac
"$stage" "$wheels" "$scratch/wheels" "$part_mib" >&2

# The validation photos of phase A (halved) or B (as shot), their truth, and the CPU's masks of them.
phase_photos() {
  local tree=$scratch/tree
  "$PYTHON" - "$carvana" "$tree" "$1" <<'PY'
import json, sys
from pathlib import Path
from PIL import Image
carvana, tree, phase = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(tree / "photos").mkdir(parents=True)
(tree / "truth").mkdir()
for stem in json.loads(Path("checkpoints/w16-320x480/config.json").read_text())["val_images"]:
    photo, truth = carvana / "train" / f"{stem}.jpg", carvana / "train_masks" / f"{stem}_mask.gif"
    if phase == "B":
        (tree / "photos" / photo.name).write_bytes(photo.read_bytes())
        (tree / "truth" / truth.name).write_bytes(truth.read_bytes())
        continue
    with Image.open(photo) as im:  # half size: a 2x2 box filter, as the photo's own pixels would average
        im.reduce(2).save(tree / "photos" / photo.name, quality=85)  # ~60 KB: the as-shot photos' ~95 KB would be ~105 KB at 95
    with Image.open(truth) as im:
        im.resize((im.width // 2, im.height // 2), Image.Resampling.NEAREST).save(tree / "truth" / truth.name)
PY
  for tta in "" -tta; do
    PYTHONPATH=$PWD "$PYTHON" -m batch.cli segment "$tree/photos" "$scratch/cpu$tta" --device cpu --decoder pillow \
      --model batch/models/default.onnx --no-progress ${tta:+--tta} >&2
    mkdir -p "$tree/cpu$tta" && cp "$scratch/cpu$tta"/*.png "$tree/cpu$tta/"
  done
  tar -cf "$scratch/photos.tar" -C "$tree" .
  echo "$(find "$tree/photos" -name '*.jpg' | wc -l) photos" >"$scratch/photos.txt"
}

if [ -n "$phase" ]; then
  [ "$phase" = C ] || phase_photos "$phase"
else
  # Photos: every validation photo of the bundled model first (its truth is scored), then the others.
  python3 - "$carvana" "$photos" >"$scratch/photos.txt" <<'PY'
import json, sys
from pathlib import Path
carvana, count = Path(sys.argv[1]), int(sys.argv[2])
val = [f"{stem}.jpg" for stem in json.loads(Path("checkpoints/w16-320x480/config.json").read_text())["val_images"]]
others = [p.name for p in sorted((carvana / "train").glob("*.jpg")) if p.name not in set(val)]
print("\n".join(f"train/{name}" for name in (val + others)[: max(count, len(val))]))
PY
  python3 - "$masks" "$scratch/photos.txt" >"$scratch/truth.txt" <<'PY'
import json, sys
from pathlib import Path
masks, photos = sys.argv[1], Path(sys.argv[2]).read_text().split()
stems = json.loads(Path("checkpoints/w16-320x480/config.json").read_text())["val_images"] if masks == "val" else [Path(p).stem for p in photos]
print("\n".join(f"train_masks/{stem}_mask.gif" for stem in stems))
PY
  cat "$scratch/photos.txt" "$scratch/truth.txt" >"$scratch/files.txt"
  tar -cf "$scratch/photos.tar" -C "$carvana" -T "$scratch/files.txt" --transform 's,^train/,photos/,;s,^train_masks/,truth/,'
fi
if [ -f "$scratch/photos.tar" ]; then
  split -b "$((part_mib * 1048576))" -d -a 2 "$scratch/photos.tar" "$scratch/photos.tar.piece-"
fi

# Every file (wheel pieces, photo pieces) into as few parts as fit: first fit, largest first.
python3 - "$scratch" "$payload" "$((part_mib * 1048576))" <<'PY'
import shutil, sys
from pathlib import Path
scratch, payload, capacity = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
files = [(f, "wheels") for f in scratch.glob("wheels/part-*/*")] + [(f, "photos") for f in scratch.glob("photos.tar.piece-*")]
parts: list[list] = []
for f, kind in sorted(files, key=lambda item: -item[0].stat().st_size):
    part = next((p for p in parts if sum(x.stat().st_size for x, _ in p) + f.stat().st_size <= capacity), None)
    if part is None:
        parts.append(part := [])
    part.append((f, kind))
for n, part in enumerate(parts):
    for f, kind in part:
        (payload / f"part-{n:02d}" / kind).mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), payload / f"part-{n:02d}" / kind / f.name)
PY
n=$(find "$payload" -mindepth 1 -maxdepth 1 -name 'part-*' | wc -l)
if [ -n "$phase" ]; then
  echo "$n parts in $payload ($(cat "$scratch/photos.txt" 2>/dev/null || echo no photos)):"
else
  echo "$n parts in $payload ($(wc -l <"$scratch/photos.txt") photos, $(wc -l <"$scratch/truth.txt") truth masks):"
fi
for part in "$payload"/part-*; do echo "  $part $(du -sm "$part" | cut -f1) MiB"; done
unpack='mkdir -p /tmp/gpu-wheels /tmp/carvana && cp -r P/wheels/. /tmp/gpu-wheels/ 2>/dev/null; cp -r P/photos/. /tmp/carvana/ 2>/dev/null; true'
if [ -n "$phase" ]; then
  cat <<EOF
Phase $phase: one lease, its calls back to back (benchmarks/gpu-acceptance.sh --plan lists them). Each call carries
one part P, in order, and runs
  $unpack
and the call that carries the last part runs, after that,
  $(PHASE=$phase python3 scripts/gpu_acceptance_plan.py --command)
EOF
else
  cat <<EOF
On the GPU host, for each part P in order (each transfer carries P), with /tmp kept between them:
  $unpack
then, once every part is there:
  cat /tmp/carvana/photos.tar.piece-* | tar -xf - -C /tmp/carvana && bash benchmarks/gpu-acceptance.sh /tmp/acceptance
EOF
fi
