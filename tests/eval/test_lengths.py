"""The CE eval's lengths: official defaults, and a clear error (lengths, limit, entry) instead
of an out-of-range position when a dataset does not fit a model's position tables."""

import dataclasses

import numpy as np
import pytest

from mmcap.config import get_preset
from mmcap.data.collate import collate_tokens
from mmcap.data.indexed import CaptionDataset
from mmcap.data.testing import write_synthetic_dataset
from mmcap.eval.lengths import SequenceTooLongError, check_position_limits, eval_batch_config


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    # prompts 15-60 ids, targets 8-120 ids, every entry with an image
    return CaptionDataset(write_synthetic_dataset(tmp_path_factory.mktemp("len") / "ds", 30))


def test_official_defaults():
    cfg = eval_batch_config()
    assert (cfg.max_prompt_tokens, cfg.max_target_tokens, cfg.keep_eos_on_crop) == (
        447,
        1024,
        True,
    )


def _with(cfg, image=None, enc=None, dec=None):
    def pos(section, n):
        return section if n is None else dataclasses.replace(section, max_position_embeddings=n)

    vision = cfg.vision if image is None else dataclasses.replace(cfg.vision, image_size=image)
    return dataclasses.replace(
        cfg, vision=vision, encoder=pos(cfg.encoder, enc), decoder=pos(cfg.decoder, dec)
    )


def test_longest_padded_lengths_are_what_the_batches_hold(ds):
    cfg = get_preset("debug-florence")  # 64 px: 5 image tokens; positions 256 / 256
    batch = eval_batch_config()
    got = check_position_limits(cfg, ds, batch)
    rows = range(len(ds))
    b = collate_tokens([ds.prompt_ids(i) for i in rows], [ds.target_ids(i) for i in rows], batch)
    assert got == {
        "encoder": 5 + b.encoder_input_ids.shape[1],
        "decoder": b.labels.shape[1],
    }
    # Exactly at the limit fits; one position less does not.
    check_position_limits(_with(cfg, enc=got["encoder"], dec=got["decoder"]), ds, batch)
    with pytest.raises(SequenceTooLongError):
        check_position_limits(_with(cfg, enc=got["encoder"] - 1), ds, batch)


def test_image_too_large_for_the_encoder_table(ds):
    """The issue's case: a tiny model (256 encoder positions) evaluated at 768 px."""
    cfg = _with(get_preset("debug-gemma"), image=768)
    longest = int(np.argmax(ds.prompts.lengths))
    with pytest.raises(SequenceTooLongError) as e:
        check_position_limits(cfg, ds, eval_batch_config())
    msg = str(e.value)
    assert "577 image tokens (768 px)" in msg and "> 256" in msg
    assert "EncoderConfig.max_position_embeddings" in msg
    assert f"entry row {longest}" in msg and repr(ds.record_id(longest)) in msg


def test_target_too_long_for_the_decoder_table(ds):
    cfg = _with(get_preset("debug-florence"), dec=64)
    with pytest.raises(SequenceTooLongError, match=r"DecoderConfig.max_position_embeddings") as e:
        check_position_limits(cfg, ds, eval_batch_config())
    longest = int(np.max(ds.targets.lengths))
    assert f"{longest} tokens after the crop to 1024" in str(e.value)
    # Cropping the targets to the table makes it fit (the training lengths would).
    check_position_limits(cfg, ds, eval_batch_config(max_target_tokens=64))
    # Only the rows asked about count.
    short = np.nonzero(ds.targets.lengths <= 64)[0]
    check_position_limits(cfg, ds, eval_batch_config(), rows=short)
