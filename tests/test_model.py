from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from unet.model import UNet, UNetConfig, count_parameters, refold


@pytest.mark.parametrize(
    ("width", "depth", "upsample", "size"),
    [(4, 1, "transpose", (6, 10)), (8, 2, "bilinear", (32, 48)), (4, 3, "transpose", (64, 40)), (2, 4, "bilinear", (48, 96))],
)
def test_output_is_one_logit_per_pixel(width, depth, upsample, size):
    model = UNet(UNetConfig(width=width, depth=depth, upsample=upsample)).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, *size)
    assert torch.isfinite(y).all()


def test_classic_unet_has_31m_parameters():
    assert count_parameters(UNet(UNetConfig())) == 31_037_633


def test_bad_input_size_names_sizes_that_work():
    model = UNet(UNetConfig(width=2, depth=4))
    with pytest.raises(ValueError, match=r"multiples of 16.*320x480") as err:
        model(torch.zeros(1, 3, 321, 479))
    assert "321x479" in str(err.value)


@pytest.mark.parametrize("bad", [dict(width=0), dict(depth=0), dict(depth=9), dict(upsample="nearest")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        UNetConfig(**bad)


def test_config_round_trips_through_dict():
    cfg = UNetConfig(width=16, depth=3, upsample="bilinear")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_a_folded_unet_sees_and_predicts_at_full_size_while_computing_at_half():
    model = UNet(UNetConfig(width=4, depth=2, fold=2)).eval()
    assert model.config.multiple == 8 and model.stem[0].in_channels == 12 and model.head.out_channels == 4
    seen = {}
    model.downs[0].register_forward_pre_hook(lambda module, inputs: seen.update(grid=tuple(inputs[0].shape[-2:])))
    with torch.no_grad():
        y = model(torch.randn(2, 3, 32, 48))
    assert y.shape == (2, 1, 32, 48) and seen["grid"] == (16, 24)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.zeros(1, 3, 36, 48))


def test_refold_starts_where_the_unfolded_network_was():
    """Folded weights from unfolded ones: the same logits as the unfolded net on the 2x2-averaged photo, repeated per block."""
    config = UNetConfig(width=4, depth=2)
    unfolded = UNet(config).eval()
    folded = UNet(replace(config, fold=2)).eval()
    folded.load_state_dict(refold(unfolded.state_dict(), config, folded.config))
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = F.interpolate(unfolded(F.avg_pool2d(x, 2)), scale_factor=2, mode="nearest")
        assert torch.allclose(folded(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="only the fold"):
        refold(unfolded.state_dict(), config, replace(config, fold=2, width=8))
    with pytest.raises(ValueError, match="fold 1 to fold >= 2"):
        refold(folded.state_dict(), folded.config, folded.config)


@pytest.mark.parametrize("fold", [0, 5])
def test_fold_is_validated(fold):
    with pytest.raises(ValueError, match="fold"):
        UNetConfig(fold=fold)
