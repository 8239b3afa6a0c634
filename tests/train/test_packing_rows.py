"""Row lengths of data.packing: automatic rows from the training data's mean lengths under the
sampling target, and the errors for rows that cannot hold a sample."""

import pytest

from mmcap.config import ConfigError, get_preset
from mmcap.data.config import BatchConfig
from mmcap.train.config import DataConfig, OptimConfig, TrainConfig
from mmcap.train.data import expected_lengths, packing_row_lengths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmcap.data.indexed import CaptionDataset
    from mmcap.data.testing import write_synthetic_dataset

    path = write_synthetic_dataset(tmp_path_factory.mktemp("d") / "train", 24, seed=2)
    return CaptionDataset(path)


def test_expected_lengths_are_the_data_means(dataset):
    import numpy as np

    from mmcap.data.prompts import ALL_KEYS

    batch = BatchConfig(max_prompt_tokens=40, max_target_tokens=64)
    key = np.asarray(dataset.entries["key"])
    present = sorted({ALL_KEYS[k] for k in key.tolist()})
    one = present[0]
    enc, dec = expected_lengths([dataset], {one: 1.0}, 5, batch)
    rows = np.nonzero(key == ALL_KEYS.index(one))[0]
    img = np.asarray(dataset.entries["image"])[rows] >= 0
    p = np.minimum(dataset.prompts.lengths[rows], 40)
    t = np.minimum(dataset.targets.lengths[rows], 64)
    assert enc == pytest.approx(float((p + 5 * img).mean()))
    assert dec == pytest.approx(float(t.mean()))
    assert expected_lengths([dataset], {}, 5, batch) is None  # no key of the target


def test_packing_row_lengths(dataset):
    model = get_preset("debug-gemma")  # 5 image tokens
    batch = BatchConfig(max_prompt_tokens=24, max_target_tokens=24)
    cfg = TrainConfig(data=DataConfig(packing=True))
    enc, dec = packing_row_lengths(cfg, model, batch)  # no data: one longest sample
    assert (enc, dec) == (29, 24)
    weights = cfg.data.sampler.target_weights()
    enc, dec = packing_row_lengths(cfg, model, batch, [dataset], weights)
    assert enc >= 29 and dec >= 24 and dec % 8 == 0 and enc % 8 == 0
    assert dec > 24, "automatic rows hold several samples"
    for field, value, match in [
        ("packing_encoder_length", 20, "shorter than one sample"),
        ("packing_decoder_length", 16, "shorter than data.batch.max_target_tokens"),
        ("packing_decoder_length", 30, "multiple of 8"),
    ]:
        bad = TrainConfig(data=DataConfig(packing=True, **{field: value}))
        with pytest.raises(ConfigError, match=match):
            packing_row_lengths(bad, model, batch)
    with pytest.raises(ConfigError, match="only used with data.packing=true"):
        DataConfig(packing_decoder_length=64)
    with pytest.raises(ConfigError, match="per_microbatch"):
        TrainConfig(data=DataConfig(packing=True), optim=OptimConfig(loss_averaging="per_microbatch"))
