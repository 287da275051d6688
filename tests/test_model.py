import pytest
import torch

from unet.model import UNet, UNetConfig, count_parameters


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
