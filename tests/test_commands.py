"""What every command shares: help text for each option, one spelling of --device, --version."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from batch.cli import main as unet_batch
from benchmarks.cli import main as unet_bench
from export.cli import main as unet_export
from unet.cli import main as unet_train

COMMANDS = {"unet-train": unet_train, "unet-export": unet_export, "unet-batch": unet_batch, "unet-bench": unet_bench}


def commands_of(name: str, command: click.Command) -> list[tuple[str, click.Command]]:
    if isinstance(command, click.Group):
        return [(f"{name} {sub}", c) for sub, c in command.commands.items()]
    return [(name, command)]


ALL = [entry for name, command in COMMANDS.items() for entry in commands_of(name, command)]


@pytest.mark.parametrize(("name", "command"), ALL, ids=[name for name, _ in ALL])
def test_every_option_has_help_text(name, command):
    missing = [p.opts[-1] for p in command.params if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert missing == [], f"{name}: options without help text: {missing}"


@pytest.mark.parametrize(
    ("name", "command"),
    [(n, c) for n, c in ALL if any(p.name == "device" for p in c.params)],
    ids=[n for n, c in ALL if any(p.name == "device" for p in c.params)],
)
def test_device_is_spelled_in_lower_case_and_read_in_any_case(name, command):
    help_text = CliRunner().invoke(command, ["--help"], prog_name=name).output
    assert "--device auto|cpu|cuda[:N]" in help_text and "AUTO" not in help_text
    device = next(p for p in command.params if p.name == "device")
    assert device.type.convert("CUDA:1", device, None) == "cuda:1"


@pytest.mark.parametrize("name", COMMANDS)
def test_version(name):
    result = CliRunner().invoke(COMMANDS[name], ["--version"], prog_name=name)
    assert result.exit_code == 0 and result.output.startswith(f"{name} ")
