"""Frozen-vision feature cache: storage statement, exact bf16 round trip, loader reads it."""

import numpy as np
import pytest
import torch

from mmcap.config import get_preset
from mmcap.data.config import BatchConfig, ImageConfig, SamplerConfig
from mmcap.data.features import FeatureStore, cache_features, describe_storage, feature_shape
from mmcap.data.images import PILDecoder
from mmcap.data.indexed import CaptionDataset
from mmcap.data.loader import iterate_batches
from mmcap.data.preprocess import preprocess
from mmcap.data.sampler import GroupIndex, TaskLangSampler
from tests.data.test_preprocess import _official_shards


def test_storage_statement_matches_the_issue():
    large = get_preset("florence-2-large").vision
    assert feature_shape(large, 224) == (50, 1024) and feature_shape(large, 768) == (577, 1024)
    # ~10M pretraining images at 224 px: 1.024 TB.
    text = describe_storage(10_000_000, large, 224)
    assert text.endswith("= 1,024,000,000,000 B (953.67 GiB)"), text


def test_cache_round_trip_and_loader(tmp_path, tiny_tokenizers):
    from mmcap.model.vision import VisionTower

    _official_shards(tmp_path, n_shards=1, per_shard=5, seed=4)
    preprocess(
        [str(tmp_path / "shard-000.tar")],
        *tiny_tokenizers,
        str(tmp_path / "ds"),
        show_progress=False,
    )
    ds = CaptionDataset(tmp_path / "ds")
    vision = get_preset("debug-florence").vision
    torch.manual_seed(0)
    tower = VisionTower(vision).freeze()
    lines = []
    meta = cache_features(
        ds, tower, vision, tmp_path / "feat", image_size=64, batch_size=2, log=lines.append
    )
    assert "5 images x 5 tokens x 64 values x 2 B (bf16) = 3,200 B" in lines[0]
    assert meta["tokens"] == 5 and meta["images"] == 5
    store = FeatureStore(tmp_path / "feat", ds)
    pixels = PILDecoder(ImageConfig(size=64))([ds.image_bytes(r) for r in range(5)])
    with torch.no_grad():
        expect = tower(pixels).to(torch.bfloat16)
    got = torch.stack([store[r] for r in range(5)])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expect, rtol=0, atol=0)  # stored bits, read back unchanged
    # Training reads features instead of pixels.
    sampler = TaskLangSampler([GroupIndex.from_dataset(ds)], SamplerConfig(global_batch_size=4))
    batch = next(iterate_batches([ds], sampler, BatchConfig(), features=[store]))
    assert batch.pixels is None and batch.features.shape == (4, 5, 64)
    for i, row in enumerate(batch.image.tolist()):
        torch.testing.assert_close(batch.features[i], store[row], rtol=0, atol=0)
    with pytest.raises(FileExistsError):
        cache_features(ds, tower, vision, tmp_path / "feat", image_size=64)
    with pytest.raises(FileNotFoundError, match="not a complete feature cache"):
        FeatureStore(tmp_path / "ds")
    assert np.array_equal(store.gather(np.array([-1, 0]))[0].float().numpy(), np.zeros((5, 64)))
