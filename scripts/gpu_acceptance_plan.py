#!/usr/bin/env python3
"""``benchmarks/gpu-acceptance.sh --plan``: the GPU acceptance run cut into phases that fit this workplace's leases.

A lent GPU machine takes 64 MiB per call, the repository included, and keeps /tmp only while it is
warm (30 s after a call); a lease has 15 device minutes, the machine's start included. The wheels
alone are hundreds of MiB, so a phase is a run of back-to-back calls, each carrying one part
(``benchmarks/gpu-pack.sh --phase P`` makes them), the last one also running the phase's checks.
Most important evidence first:

- A: ONNX Runtime's CUDA provider (onnxruntime-gpu only): a fresh-process CUDA check, the ``gpu``
  tests, the validation photos (pre-resized, with CPU reference masks made here) segmented on the
  GPU and scored, throughput on hard-linked copies with stage times, the PyTorch peer.
- B: DALI's ``mixed`` decoder: its agreement with the CPU masks and an end-to-end run.
- C: the suites: the whole test suite on the GPU host, and ``unet-bench``.

Sizes: the staged parts when ``.gpu-payload/P`` holds them, else the wheels' sizes in
``scripts/gpu_wheels.tsv`` (read from the package index) and the photos' in the data folder; the
device minutes are estimates (constants below). Standard library only: it runs before anything
is installed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
CALL_LIMIT_MIB = 64  # what one call may carry, the repository included
MARGIN_MIB = 3  # gpu-pack.sh's headroom beside the repository
PIECE_SLACK_MIB = 2  # stage-gpu-wheels cuts wheels into pieces this much under the part size
START_MINUTES = 1.5  # a machine's start ("a minute or more")
CALL_MINUTES = 1 / 3  # one call's transfer (<= 64 MiB) and overhead, estimated: no call has been timed here
LEASE_MINUTES = 15
VAL_PHOTOS = 160
HALF_SIZE_PHOTO_BYTES = 62 * 1024  # a 959x640 JPEG (quality 85) of a studio car: 61 KB on 20 validation photos
MASK_BYTES = 3 * 1024  # a 959x640 binary mask, GIF or PNG: 1.8 to 2.8 KB measured
FULL_SIZE_MASK_BYTES = 8 * 1024  # a 1918x1280 binary PNG mask, estimated


@dataclass(frozen=True)
class Phase:
    name: str
    purpose: str
    wheels: tuple[str, ...]  # groups of gpu_wheels.tsv
    photos: str | None  # the phase's photo payload: "half" (pre-resized, CPU masks), "full" (as shot), None
    work_minutes: float  # the checks the last call runs, estimated

    @property
    def runs(self) -> str:
        """What the call that carries the last part runs, after copying it in: unpack the photos, run the phase."""
        return (
            "{ ! compgen -G '/tmp/carvana/photos.tar.piece-*' >/dev/null || cat /tmp/carvana/photos.tar.piece-* "
            f"| tar -xf - -C /tmp/carvana; }} && PHASE={self.name} ARCHIVE=$OUT/acceptance-{self.name}.tgz "
            "bash benchmarks/gpu-acceptance.sh /tmp/acceptance"
        )


PHASES = (
    Phase(
        "A",
        "ONNX Runtime's CUDA provider (no DALI)",
        ("ort",),
        "half",
        5.0,  # install 0.5, fresh check 0.3, gpu tests 1, segment and score 1, throughput 1, peer 1.2
    ),
    Phase("B", "DALI's mixed decoder", ("ort", "dali"), "full", 4.0),  # install 1, DALI tests 1, segment 1, throughput 1
    Phase("C", "the suites", ("ort", "dali"), None, 7.0),  # install 1, the whole suite 3, unet-bench 3
)


@dataclass(frozen=True)
class Piece:
    name: str
    size: int  # bytes


def tree_bytes() -> int:
    """What travels with every call: the files git tracks, and the untracked ones it does not ignore."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def recorded_wheels(groups: tuple[str, ...]) -> list[Piece]:
    lines = (REPO / "scripts" / "gpu_wheels.tsv").read_text().splitlines()
    rows = (line.split("\t") for line in lines if not line.startswith("#"))
    return [Piece(name, int(size)) for group, name, size in rows if group in groups]


def photo_payload(kind: str | None, carvana: Path) -> tuple[list[Piece], str]:
    """The phase's photos (one tar), and where its size comes from."""
    if kind is None:
        return [], ""
    val = json.loads((REPO / "checkpoints" / "w16-320x480" / "config.json").read_text())["val_images"][:VAL_PHOTOS]
    if kind == "half":  # photos, truth, and two sets of CPU masks (plain, TTA)
        size = len(val) * (HALF_SIZE_PHOTO_BYTES + 3 * MASK_BYTES)
        return [Piece("photos.tar (estimated)", size)], "estimated"
    files = [carvana / "train" / f"{stem}.jpg" for stem in val] + [carvana / "train_masks" / f"{stem}_mask.gif" for stem in val]
    masks = 2 * len(val) * FULL_SIZE_MASK_BYTES  # the CPU's, plain and TTA (estimated)
    if all(f.is_file() for f in files):
        return [Piece("photos.tar", sum(f.stat().st_size for f in files) + masks)], "the data folder and estimated masks"
    return [Piece("photos.tar (estimated)", len(val) * 100 * 1024 + masks)], "estimated"


def staged(phase: Phase) -> list[list[Piece]] | None:
    """The parts gpu-pack.sh made for ``phase``, as they are, or None."""
    folder = REPO / ".gpu-payload" / phase.name
    parts = sorted(folder.glob("part-*")) if folder.is_dir() else []
    if not parts:
        return None
    return [[Piece(f.name, f.stat().st_size) for f in sorted(p.rglob("*")) if f.is_file()] for p in parts]


def cut(files: list[Piece], piece_bytes: int) -> list[Piece]:
    """Files larger than a piece cut into pieces (wheels as stage-gpu-wheels cuts them, the photo tar as gpu-pack.sh does)."""
    pieces = []
    for f in files:
        count = math.ceil(f.size / piece_bytes) if f.size > piece_bytes else 1
        if count == 1:
            pieces.append(f)
            continue
        pieces += [Piece(f"{f.name}.piece-{i:02d}", min(piece_bytes, f.size - i * piece_bytes)) for i in range(count)]
    return pieces


def pack(pieces: list[Piece], capacity: int) -> list[list[Piece]]:
    """First fit, largest first: gpu-pack.sh's packing."""
    parts: list[list[Piece]] = []
    for piece in sorted(pieces, key=lambda p: -p.size):
        part = next((p for p in parts if sum(x.size for x in p) + piece.size <= capacity), None)
        if part is None:
            parts.append(part := [])
        part.append(piece)
    return parts


def plan_phase(phase: Phase, capacity_mib: int, carvana: Path) -> tuple[list[list[Piece]], str]:
    parts = staged(phase)
    if parts is not None:
        return parts, f".gpu-payload/{phase.name} (staged)"
    photos, source = photo_payload(phase.photos, carvana)
    wheels = cut(recorded_wheels(phase.wheels), (capacity_mib - PIECE_SLACK_MIB) * MIB)
    pieces = wheels + cut(photos, capacity_mib * MIB)
    return pack(pieces, capacity_mib * MIB), "scripts/gpu_wheels.tsv" + (f", photos: {source}" if source else "")


def minutes(calls: int, phase: Phase) -> float:
    return START_MINUTES + calls * CALL_MINUTES + phase.work_minutes


def describe(phase: Phase, parts: list[list[Piece]], source: str) -> list[str]:
    lines = [f"phase {phase.name}: {phase.purpose} (sizes: {source})"]
    for i, part in enumerate(parts):
        carried = ", ".join(f"{p.name} {p.size / MIB:.1f}" for p in part)
        last = i == len(parts) - 1
        lines.append(
            f"  call {i + 1}: carry .gpu-payload/{phase.name}/part-{i:02d} ({sum(p.size for p in part) / MIB:.1f} MiB: {carried})"
            + (f"; then run: {phase.runs}" if last else "")
        )
    total = minutes(len(parts), phase)
    over = f" (over a lease's {LEASE_MINUTES}: split it)" if total > LEASE_MINUTES else ""
    lines.append(f"phase {phase.name}: {len(parts)} calls, {total:.1f} estimated device minutes{over}")
    return lines


def main(argv: list[str]) -> int:
    if argv[:1] == ["--command"]:  # the last call's command of the phase named by $PHASE (gpu-pack.sh prints it)
        print(next(p for p in PHASES if p.name == os.environ["PHASE"]).runs)
        return 0
    carvana = Path(argv[0]) if argv else REPO.parent / "shared" / "data" / "carvana"
    tree_mib = tree_bytes() / MIB
    capacity = CALL_LIMIT_MIB - math.floor(tree_mib) - MARGIN_MIB  # as gpu-pack.sh sizes its parts
    print(
        f"GPU acceptance plan: {CALL_LIMIT_MIB} MiB a call, the repository {tree_mib:.1f} MiB of it, parts of at most "
        f"{capacity} MiB; a machine's start {START_MINUTES} min, a call {CALL_MINUTES * 60:.0f} s (estimated); "
        f"one lease per phase, its calls back to back (the machine keeps /tmp 30 s after a call)"
    )
    for phase in PHASES:
        parts, source = plan_phase(phase, capacity, carvana)
        print("\n".join(describe(phase, parts, source)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
