"""Checkpoints: plain dicts of tensors and primitives that ``torch.load(weights_only=True)`` reads.

Keys: ``kind``, ``format``, ``model`` (state_dict), ``model_config``, ``train_config``, ``input_size``
([H, W]), ``pixel_mean``, ``pixel_std``, ``train_images``, ``val_images``, ``val_cars``, ``val_dice``,
``epoch`` (completed epochs) and, in ``last.pt``, ``optimizer``, ``scaler``, ``step``,
``best_val_dice`` and ``rng`` for ``--resume``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from batch.core.errors import CarvanaError
from batch.core.files import write_atomic
from unet.model import UNet, UNetConfig

KIND = "carvana-unet-checkpoint"
FORMAT = 1


class CheckpointError(CarvanaError):
    """A file that is not a readable checkpoint of this project; the message names it."""


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write atomically (a temp file in the same folder, flushed to disk, then a rename)."""
    buffer = io.BytesIO()
    torch.save({"kind": KIND, "format": FORMAT, **state}, buffer)
    write_atomic(Path(path), buffer.getvalue(), durable=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (no arbitrary unpickling) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(e).__name__}): it is damaged, not a PyTorch file, or holds "
            "Python objects beyond tensors and plain values, which are never unpickled here. "
            "Pass a best.pt or last.pt written by unet-train."
        ) from e
    if not isinstance(state, dict) or state.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a unet-train checkpoint: pass a best.pt or last.pt written by unet-train")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {state.get('format')}; this version reads format {FORMAT}")
    return state


def compact_optimizer_state(optimizer_state: dict) -> dict:
    """The optimizer's floating-point state (Adam's moments) in bfloat16: a third smaller ``last.pt``.

    ``Optimizer.load_state_dict`` casts the moments back to the parameters' dtype, so a resumed run
    continues with moments rounded to 8 bits of mantissa: not bit-exact, harmless to training, and
    it keeps the ``last.pt`` of a width-16 U-Net under 20 MB, small enough to carry in a repository
    between sessions.
    """

    def shrink(value):
        return value.to(torch.bfloat16) if torch.is_tensor(value) and value.is_floating_point() and value.dim() else value

    state = {param: {k: shrink(v) for k, v in slots.items()} for param, slots in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def model_from_checkpoint(state: dict) -> UNet:
    """Rebuild the network from a loaded checkpoint, in eval mode."""
    model = UNet(UNetConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.eval()
