"""``unet-batch``: segment folders of car photos with an exported U-Net, and score the masks.

One module per command (:mod:`batch.cli.segment`, :mod:`batch.cli.evaluate`); the options the project's
commands share are in :mod:`batch.cli.options`. Exit codes: 0 everything succeeded; 1 some photos
failed, or inference stopped the run (the rest are done; see report.json); 2 usage errors (missing
input folder, bad model file, unusable device, unwritable output, a missing extra); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). The libraries (ONNX Runtime, the runner) are imported inside the
commands, so ``--help`` needs none.
"""

from __future__ import annotations

import click

from batch.cli.options import Group, version_option

COMMANDS = {"segment": "batch.cli.segment:segment_command", "evaluate": "batch.cli.evaluate:evaluate_command"}


@click.group(cls=Group, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@version_option
def main() -> None:
    """Segment car photos with an exported U-Net (ONNX Runtime; no torch needed)."""


if __name__ == "__main__":
    main()
