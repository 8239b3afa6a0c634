"""Official data behaviours behind switches (PreprocessConfig.long_entries / truncated_images):
long entries kept whole and cropped when batched, truncated JPEGs kept and loaded as PIL's
LOAD_TRUNCATED_IMAGES loads them; counted in the manifest whichever way they go."""

import io
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmcap.config import ConfigError
from mmcap.data.collate import collate_tokens
from mmcap.data.config import BatchConfig, ImageConfig, PreprocessConfig
from mmcap.data.images import PILDecoder
from mmcap.data.indexed import CaptionDataset
from mmcap.data.preprocess import preprocess
from mmcap.data.records import check_jpeg, loads_truncated
from mmcap.data.testing import make_jpeg, make_png, synthetic_entries, write_official_tar
from tools.preprocess_data import main as preprocess_main

MAX_TARGET = 40
_FULL = make_jpeg(3, size=(120, 90))
TRUNCATED = _FULL[: len(_FULL) // 2]  # header + half of the scan


def _tar(root):
    rng = random.Random(0)
    good = synthetic_entries(rng, ["caption-en", "translation-de"])
    long = dict(good[0], output="the red car " * 40)  # > MAX_TARGET Gemma tokens
    samples = [
        ("ok", make_jpeg(1), json.dumps([good[0], long]).encode()),  # 1 fine + 1 long entry
        ("trunc", TRUNCATED, json.dumps(good).encode()),  # truncated JPEG, 2 entries
        ("png", make_png(2), json.dumps(good).encode()),  # not a JPEG: rejected in both modes
    ]
    return write_official_tar(root / "in.tar", samples), long


def test_truncated_jpeg_is_recognised():
    assert check_jpeg(TRUNCATED) is not None  # not a readable JPEG as such
    assert loads_truncated(TRUNCATED)
    assert not loads_truncated(make_png(2)) and not loads_truncated(_FULL[:600])  # no scan


@pytest.mark.parametrize("official", [False, True])
def test_kept_or_rejected_and_counted_either_way(tmp_path, tiny_tokenizers, official):
    gemma, bart = tiny_tokenizers
    tar, long = _tar(tmp_path)
    cfg = PreprocessConfig(
        max_target_tokens=MAX_TARGET,
        long_entries="keep" if official else "reject",
        truncated_images="load" if official else "reject",
    )
    m = preprocess([str(tar)], gemma, bart, str(tmp_path / "out"), cfg, show_progress=False)
    assert (m["counts"]["long_entries"], m["counts"]["truncated_images"]) == (1, 1)
    assert m["config"]["long_entries"] == cfg.long_entries
    rejects = {k: v for k, v in m["rejects"].items() if v}
    ds = CaptionDataset(tmp_path / "out")
    records = sorted({ds.record_id(i) for i in range(len(ds))})
    if not official:
        assert rejects == {"too_long": 1, "bad_image": 2} and len(ds) == 1
        assert records == ["ok"]
        return
    assert rejects == {"bad_image": 1} and len(ds) == 4 and records == ["ok", "trunc"]
    row = next(i for i in range(len(ds)) if ds.trace(i)["entry"] == 1 and ds.record_id(i) == "ok")
    stored = ds.target_ids(row)
    assert len(stored) > MAX_TARGET  # whole in the dataset, cropped when batched
    batch = collate_tokens([ds.prompt_ids(row)], [stored], BatchConfig(max_target_tokens=32))
    assert batch.labels.tolist() == [stored[:32].tolist()]
    # The kept truncated JPEG decodes as PIL with LOAD_TRUNCATED_IMAGES decodes it.
    row = next(i for i in range(len(ds)) if ds.record_id(i) == "trunc")
    jpeg = ds.image_bytes(int(ds.entries["image"][row]))
    assert jpeg == TRUNCATED
    got = PILDecoder(ImageConfig(size=32)).resize_uint8(jpeg)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # restored after the decode
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            want = np.asarray(im.convert("RGB").resize((32, 32), Image.BICUBIC))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    np.testing.assert_array_equal(got, want)
    with pytest.raises(OSError, match="truncated"):
        PILDecoder(ImageConfig(size=32, load_truncated=False)).resize_uint8(jpeg)


def test_cli_switches_and_validation(tmp_path, tiny_tokenizers, capsys):
    gemma, bart = tiny_tokenizers
    tar, _ = _tar(tmp_path)
    args = ["--input", str(tar), "--gemma-tokenizer", gemma, "--encoder-tokenizer", bart]
    args += ["--out", str(tmp_path / "out"), "--max-target-tokens", str(MAX_TARGET), "--quiet"]
    assert preprocess_main([*args, "--long-entries", "keep", "--truncated-images", "load"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["entries"] == 4 and summary["rejects"]["bad_image"] == 1
    with pytest.raises(ConfigError, match="PreprocessConfig.long_entries"):
        PreprocessConfig(long_entries="crop")
    with pytest.raises(ConfigError, match="PreprocessConfig.truncated_images"):
        PreprocessConfig(truncated_images="yes")
