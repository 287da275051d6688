import json
import math

import pytest
import torch
from click.testing import CliRunner

from batch.core.devices import DeviceError
from unet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from unet.cli import main as train_cli
from unet.data import DataError
from unet.model import UNetConfig
from unet.train import TrainConfig, Trainer, TrainingInterrupted, lr_at, train

TINY = UNetConfig(width=4, depth=2)


def tiny_config(data_dir, out_dir, **overrides) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), epochs=2, batch_size=4, scale=0.5, device="cpu", val_cars=1)
    return TrainConfig(**base | overrides)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_on_synthetic_cars_lowers_the_loss(kaggle_dir, tmp_path):
    run = tmp_path / "run"
    state = train(tiny_config(kaggle_dir, run, epochs=6, lr=1e-2, scale=1.0), UNetConfig(width=8, depth=2), progress=False)
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[-1]["train_loss"] < 0.7 * metrics[0]["train_loss"]
    assert {"epoch", "train_loss", "val_dice", "seconds", "val_loss"} <= metrics[0].keys()
    assert state.best_val_dice == pytest.approx(max(m["val_dice"] for m in metrics), abs=1e-6)
    assert state.best_val_dice > 0.5
    for name in ("best.pt", "last.pt", "config.json"):
        assert (run / name).is_file()


def test_checkpoint_round_trip(tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)  # no arbitrary unpickling needed
    assert {"model", "model_config", "train_config", "val_dice", "epoch", "input_size"} <= state.keys()
    assert "optimizer" not in state  # best.pt carries weights only
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    x = torch.randn(1, 3, 64, 96)
    again = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert state["input_size"] == [64, 96]


def test_foreign_files_are_not_checkpoints(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a unet-train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_continues_where_it_stopped(kaggle_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(kaggle_dir, run, epochs=1), TINY, progress=False)
    first = torch.load(run / "last.pt", weights_only=True)
    state = train(tiny_config(kaggle_dir, run, epochs=3), TINY, resume=run / "last.pt", progress=False)
    assert state.epoch == 3
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["step"] == 3 * first["step"]
    assert not torch.equal(last["model"]["head.weight"], first["model"]["head.weight"])


def test_stop_after_pauses_on_the_full_schedule(kaggle_dir, tmp_path):
    paused, whole = tmp_path / "paused", tmp_path / "whole"
    state = train(tiny_config(kaggle_dir, paused, epochs=3), TINY, progress=False, stop_after=1)
    assert state.epoch == 1
    train(tiny_config(kaggle_dir, paused, epochs=3), TINY, resume=paused / "last.pt", progress=False)
    train(tiny_config(kaggle_dir, whole, epochs=3), TINY, progress=False)
    # The same learning rates as one uninterrupted run: the pause did not shorten the schedule.
    assert [m["lr"] for m in read_metrics(paused)] == pytest.approx([m["lr"] for m in read_metrics(whole)])
    assert [m["epoch"] for m in read_metrics(paused)] == [1, 2, 3]


def test_resume_into_a_new_folder_carries_the_history(kaggle_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny_config(kaggle_dir, first, epochs=1), TINY, progress=False)
    train(tiny_config(kaggle_dir, second, epochs=2), TINY, resume=first / "last.pt", progress=False)
    assert [m["epoch"] for m in read_metrics(second)] == [1, 2]
    assert read_metrics(second)[0] == read_metrics(first)[0]


def test_resume_needs_last_not_best(kaggle_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(kaggle_dir, run, epochs=1), TINY, progress=False)
    with pytest.raises(DataError, match="last.pt"):
        Trainer(tiny_config(kaggle_dir, run, epochs=2), TINY, resume=run / "best.pt", progress=False)


def test_init_starts_a_new_schedule_from_a_checkpoints_weights(kaggle_dir, tmp_path):
    first, tuned = tmp_path / "first", tmp_path / "tuned"
    train(tiny_config(kaggle_dir, first, epochs=1), TINY, progress=False)
    source = load_checkpoint(first / "best.pt")
    config = tiny_config(kaggle_dir, tuned, epochs=2, scale=0.75, init=first / "best.pt")
    trainer = Trainer(config, UNetConfig(width=8, depth=3), progress=False)  # the architecture comes from --init
    assert trainer.model_cfg == TINY and trainer.state.epoch == 0
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, source["model"][name]), name
    trainer.run()
    best = load_checkpoint(tuned / "best.pt")
    assert [m["epoch"] for m in read_metrics(tuned)] == [1, 2]  # a schedule of its own, not a continuation
    assert best["train_config"]["init"] == str(first / "best.pt") and best["input_size"] != source["input_size"]


def test_init_with_a_fold_refolds_the_weights_and_records_it(kaggle_dir, tmp_path):
    """unet-train --init unfolded.pt --fold 2 trains a folded network and records the fold and the boundary weight."""
    first, folded = tmp_path / "first", tmp_path / "folded"
    train(tiny_config(kaggle_dir, first, epochs=1, size=(32, 48)), TINY, progress=False)
    options = "--fold 2 --size 64x96 --epochs 1 --batch-size 4 --val-cars 1 --device cpu --no-progress --boundary-weight 2"
    args = [str(kaggle_dir), "--out", str(folded), "--init", str(first / "best.pt"), *options.split()]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    last = load_checkpoint(folded / "last.pt")
    assert last["model_config"]["fold"] == 2 and last["input_size"] == [64, 96]
    assert last["train_config"]["boundary_weight"] == 2.0
    assert model_from_checkpoint(last)(torch.zeros(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    resume = ["--out", str(tmp_path / "r"), "--resume", str(folded / "last.pt"), "--fold", "2"]
    refused = CliRunner().invoke(train_cli, [str(kaggle_dir), *resume])
    assert refused.exit_code == 2 and "--fold" in refused.output


def test_init_refuses_a_checkpoint_validated_on_other_cars(kaggle_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(kaggle_dir, run, epochs=1), TINY, progress=False)
    with pytest.raises(DataError, match="validated on other cars"):
        Trainer(tiny_config(kaggle_dir, tmp_path / "b", val_cars=2, init=run / "best.pt"), TINY, progress=False)


def test_init_with_resume_or_an_architecture_is_a_usage_error(tiny_checkpoint, kaggle_dir, tmp_path):
    for extra in (["--resume", str(tiny_checkpoint)], ["--width", "8"]):
        args = [str(kaggle_dir), "--out", str(tmp_path / "r"), "--init", str(tiny_checkpoint), *extra]
        result = CliRunner().invoke(train_cli, args)
        assert result.exit_code == 2 and ("not both" in result.output or "architecture" in result.output), result.output


def test_ctrl_c_saves_last_checkpoint(kaggle_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(kaggle_dir, run, epochs=5), TINY, progress=False)
    real_epoch, calls = trainer.train_epoch, []

    def interrupt_second_epoch():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch()

    monkeypatch.setattr(trainer, "train_epoch", interrupt_second_epoch)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and "optimizer" in saved
    assert not list(run.glob(".*"))  # no temporary file left behind


def test_learning_rate_warms_up_then_decays():
    rates = [lr_at(step, 100, 10, 1e-3) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(1e-3)
    assert rates[100] == pytest.approx(1e-5)
    assert all(a <= b for a, b in zip(rates[:10], rates[1:11]))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


TINY_CLI = [
    "--batch-size",
    "4",
    "--scale",
    "0.5",
    "--width",
    "4",
    "--depth",
    "2",
    "--device",
    "cpu",
    "--val-cars",
    "1",
    "--no-progress",
]


def test_cli_writes_a_run_folder(kaggle_dir, tmp_path):
    run = tmp_path / "run"
    args = [str(kaggle_dir), "--out", str(run), "--epochs", "1", *TINY_CLI]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert "best validation Dice" in result.output
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"]["width"] == 4 and config["input_size"] == [32, 48]
    assert len(config["val_images"]) == 4


def test_cli_stop_after_says_how_to_continue(kaggle_dir, tmp_path):
    run = tmp_path / "run"
    args = [str(kaggle_dir), "--out", str(run), "--epochs", "3", "--stop-after", "1", *TINY_CLI]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    assert "paused after epoch 1 of 3" in result.output and f"--resume {run / 'last.pt'}" in result.output
    assert len(read_metrics(run)) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--size", "30x40"], "multiples of 4"),
        (["--scale", "0.5", "--size", "32x48"], "not both"),
        (["--val-cars", "9"], "--val-cars"),
        (["--device", "CUDA"] if not torch.cuda.is_available() else ["--device", "CUDA:99"], "--device cuda:"),
        (["--device", "gpu"], "'gpu' is not a device"),
    ],
)
def test_cli_explains_bad_options(kaggle_dir, tmp_path, extra, message):
    args = [str(kaggle_dir), "--out", str(tmp_path / "run"), "--width", "4", "--depth", "2", "--no-progress"] + extra
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 2
    assert message in result.output


def test_train_config_device_is_canonical():
    assert TrainConfig("d", "o", device="CUDA:1").device == "cuda:1"
    with pytest.raises(DeviceError, match="'gpu' is not one of auto, cpu, cuda, cuda:N"):
        TrainConfig("d", "o", device="gpu")


def test_cli_names_a_bad_mask(kaggle_dir, tmp_path):
    (kaggle_dir / "train_masks" / "000000000003_04_mask.gif").write_bytes(b"")
    args = [str(kaggle_dir), "--out", str(tmp_path / "run"), "--width", "4", "--depth", "2", "--no-progress", "--val-cars", "1"]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 2
    assert "000000000003_04_mask.gif" in result.output


@pytest.mark.slow
def test_short_run_on_real_carvana_photos(carvana_dir, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(data_dir=str(carvana_dir), out_dir=str(run), epochs=1, batch_size=4, scale=0.0625, device="cpu", limit=32)
    state = train(cfg, UNetConfig(width=4, depth=4), progress=False)
    (record,) = read_metrics(run)
    assert state.epoch == 1 and 0 <= record["val_dice"] <= 1
    checkpoint = load_checkpoint(run / "best.pt")
    assert checkpoint["input_size"] == [80, 112] and checkpoint["train_images"] == 16 and checkpoint["val_images"] == 16


def test_last_checkpoint_keeps_adam_moments_in_bfloat16(kaggle_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(kaggle_dir, run, epochs=1), TINY, progress=False)
    moments = torch.load(run / "last.pt", weights_only=True)["optimizer"]["state"]
    assert moments and all(slots["exp_avg"].dtype == torch.bfloat16 for slots in moments.values())
    trainer = Trainer(tiny_config(kaggle_dir, run, epochs=2), TINY, resume=run / "last.pt", progress=False)
    restored = trainer.optimizer.state_dict()["state"]
    assert all(slots["exp_avg_sq"].dtype == torch.float32 for slots in restored.values())


def test_zoom_and_shift_moves_photo_and_target_together():
    """A bright square in the photo and its target land on the same pixels after the random zoom and shift."""
    from unet.train import zoom_and_shift

    x = torch.zeros(4, 3, 32, 48)
    x[:, :, 12:20, 18:30] = 1.0
    y = x[:, :1].clone()
    gen = torch.Generator().manual_seed(1)
    draw = lambda: torch.rand(4, 1, 1, 1, generator=gen)  # noqa: E731
    moved_x, moved_y = zoom_and_shift(x, y, 0.2, draw)
    assert not torch.allclose(moved_y, y)  # something moved
    assert torch.allclose(moved_x[:, :1], moved_y) and torch.allclose(moved_x[:, 1:], moved_y.expand(-1, 2, -1, -1))
    assert torch.allclose(zoom_and_shift(x, y, 0.0, draw)[1], y, atol=1e-6)  # no jitter: the identity


def test_loss_is_chosen_validated_and_recorded(kaggle_dir, tmp_path):
    with pytest.raises(ValueError, match="loss must be one of bce-dice, bce-lovasz"):
        TrainConfig(data_dir=str(kaggle_dir), out_dir=str(tmp_path), loss="dice")
    run = tmp_path / "run"
    args = [str(kaggle_dir), "--out", str(run), "--width", "4", "--depth", "2", "--epochs", "1", "--no-progress"]
    result = CliRunner().invoke(train_cli, args + ["--loss", "bce-lovasz", "--scale", "0.25"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "best.pt")["train_config"]["loss"] == "bce-lovasz"
    assert math.isfinite(read_metrics(run)[0]["train_loss"])


def test_scale_jitter_is_validated_and_recorded(kaggle_dir, tmp_path):
    with pytest.raises(ValueError, match="scale_jitter"):
        TrainConfig(data_dir=str(kaggle_dir), out_dir=str(tmp_path), scale_jitter=0.6)
    assert TrainConfig(data_dir=str(kaggle_dir), out_dir=str(tmp_path), scale_jitter=0.1).to_dict()["scale_jitter"] == 0.1
