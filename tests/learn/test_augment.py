import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import UnknownNameError
from geoseg.learn.augment import (
    BrightnessContrast,
    Compose,
    HFlip,
    Noise,
    Rot90,
    ScaleCrop,
    VFlip,
    from_config,
    transform,
)
from geoseg.learn.config import AugmentConfig

IGNORE = -100


def _pair(bands: int, size: int = 16):
    """A target with distinct values per pixel and an image whose every band equals the target."""
    target = torch.arange(size * size).reshape(size, size)
    image = target[None].float().repeat(bands, 1, 1)
    return image, target


@settings(max_examples=40, deadline=None)
@given(bands=st.integers(1, 7), seed=st.integers(0, 10_000))
def test_geometric_transforms_move_image_and_mask_together(bands, seed):
    image, target = _pair(bands)
    g = torch.Generator().manual_seed(seed)
    pipe = Compose([HFlip(0.5), VFlip(0.5), Rot90(1.0)])
    img, tgt = pipe(image, target, g)
    assert img.shape == image.shape and tgt.shape == target.shape
    for b in range(bands):
        assert torch.equal(img[b].long(), tgt)
    assert sorted(tgt.flatten().tolist()) == list(range(256))  # a permutation: nothing lost


@settings(max_examples=30, deadline=None)
@given(bands=st.integers(1, 5), seed=st.integers(0, 10_000), lo=st.floats(0.5, 1.0), hi=st.floats(1.0, 2.0))
def test_scale_crop_keeps_the_chip_size_and_ignores_padding(bands, seed, lo, hi):
    image = torch.zeros(bands, 32, 32)
    image[:, :, 16:] = 1.0
    target = torch.zeros(32, 32, dtype=torch.long)
    target[:, 16:] = 1
    img, tgt = ScaleCrop(lo, hi, 1.0, IGNORE)(image, target, torch.Generator().manual_seed(seed))
    assert img.shape == image.shape and tgt.shape == target.shape
    assert set(tgt.unique().tolist()) <= {0, 1, IGNORE}
    lab = tgt != IGNORE
    # away from the class edge, the resampled image still agrees with the mask
    agree = (img[0][lab].round().long() == tgt[lab]).float().mean()
    assert agree > 0.9


def test_photometric_transforms_leave_the_mask_alone():
    image, target = _pair(4)
    g = torch.Generator().manual_seed(0)
    img, tgt = Compose([BrightnessContrast(0.5, 0.5), Noise(0.1)])(image, target, g)
    assert torch.equal(tgt, target) and not torch.equal(img, image) and img.shape == image.shape


def test_same_seed_same_result_and_registry():
    cfg = AugmentConfig()
    pipe = from_config(cfg, IGNORE)
    assert pipe is not None and len(pipe) == 6
    image, target = _pair(3, 32)
    a = pipe(image, target, torch.Generator().manual_seed(5))
    b = pipe(image, target, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert from_config(AugmentConfig(enabled=False)) is None
    assert isinstance(transform("rot90", p=1.0), Rot90)
    with pytest.raises(UnknownNameError, match="hflip"):
        transform("twirl")
