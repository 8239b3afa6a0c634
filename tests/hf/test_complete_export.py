"""Complete exports (issue 16 item 2): tokenized data -> training checkpoint -> Hugging Face
directory that ``AutoProcessor`` + ``generate()`` use, or a refusal that says what is missing.

The run is the real trainer in-process on a world of one (:func:`train_in_process`) on a
dataset preprocessed with tiny locally trained tokenizers; the export is the command-line tool.
"""

from __future__ import annotations

import io
import json
import random
import shutil

import pytest
from PIL import Image

from mmcap.data.testing import (
    build_tiny_bart_tokenizer,
    build_tiny_gemma_tokenizer,
    make_jpeg,
    synthetic_entries,
    write_official_tar,
)
from mmcap.testing import DistributedWorkers
from mmcap.testing.train import tool_in_process, train_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world1():
    with DistributedWorkers(1, timeout=600) as w:
        yield w


@pytest.fixture(scope="module")
def run(tmp_path_factory, world1):
    """(root, dataset, run directory) of a 2-step debug-gemma run on tokenized data."""
    from mmcap.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("complete_export")
    gemma = build_tiny_gemma_tokenizer(root / "tok" / "gemma")  # 600 ids <= 1000 rows
    bart = build_tiny_bart_tokenizer(root / "tok" / "bart")  # 500 ids <= 1000 rows
    rng = random.Random(0)
    samples = [
        (f"s{i:03d}", make_jpeg(i, (48, 40)), json.dumps(synthetic_entries(rng)).encode())
        for i in range(6)
    ]
    write_official_tar(root / "train.tar", samples)
    data = root / "data"
    preprocess([str(root / "train.tar")], str(gemma), str(bart), str(data), show_progress=False)
    save = root / "run"
    args = [
        "--preset", "debug-gemma", f"data.train=[{data}]", "data.num_workers=0",
        "data.batch.max_prompt_tokens=48", f"checkpoint.save={save}", "train_steps=2",
        "global_batch_size=4", "micro_batch_size=2", "precision.params_dtype=fp32",
        "optim.warmup_steps=1", "logging.tensorboard_dir=",
    ]  # fmt: skip
    rc, out = world1.run(train_in_process, args)[0]
    assert rc == 0, out
    return root, data, save


def _export(world1, argv) -> tuple[int, str]:
    return world1.run(tool_in_process, "convert_to_hf", argv)[0]


def test_dataset_and_checkpoint_carry_the_tokenizers(run):
    from mmcap.checkpoint.inference_assets import tokenizers_in
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer
    from mmcap.train.checkpoint import validate_checkpoint

    root, data, save = run
    manifest = json.loads((data / "manifest.json").read_text())["tokenizers"]
    stored = tokenizers_in(data)
    assert stored is not None and stored.origin.endswith("(tokenizers/)")
    assert PromptTokenizer(stored.encoder_dir).content_hash == manifest["prompt"]["sha256"]
    ckpt = save / (save / "latest").read_text().strip()
    inference = ckpt / "inference"
    info = json.loads((inference / "inference.json").read_text())
    assert info["image_size"] == 64 and info["num_image_tokens"] == 5
    assert info["max_prompt_tokens"] == 48 and info["languages"][:2] == ["en", "de"]
    assert info["tokenizers"]["sha256"]["prompt"] == manifest["prompt"]["sha256"]
    assert TargetTokenizer(inference / "decoder" / "tokenizer.model").vocab_size == 600
    # The folder is part of the checkpoint: covered by its checksums (a damaged copy is seen).
    validate_checkpoint(ckpt, True)
    (inference / "decoder" / "tokenizer.model").write_bytes(b"damaged")
    with pytest.raises(Exception, match="tokenizer.model"):
        validate_checkpoint(ckpt, True)
    shutil.copyfile(stored.decoder_model, inference / "decoder" / "tokenizer.model")
    validate_checkpoint(ckpt, True)


def test_export_loads_with_auto_processor_and_generates(run, world1, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import mmcap.hf  # noqa: F401  (Auto-class registration)
    from mmcap.data.tokenizers import TargetTokenizer

    root, data, save = run
    out = tmp_path / "hf"
    rc, text = _export(world1, ["--ckpt", str(save), "--out", str(out)])  # a run directory
    assert rc == 0, text
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert processor.image_processor.size == {"height": 64, "width": 64}
    assert processor.num_image_tokens == 5 and processor.max_prompt_tokens == 48
    assert processor.image_token_id == model.config.image_token_id
    image = Image.open(io.BytesIO(make_jpeg(7, (90, 60))))
    inputs = processor(images=[image], text=["<LANG_DE><CAPTION>"])
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, num_beams=2)
    caption = processor.batch_decode(ids)[0]
    # The decoder tokenizer is the one the data was tokenized with (same pieces).
    sp = TargetTokenizer(save / (save / "latest").read_text().strip() / "inference/decoder/tokenizer.model")
    assert caption == sp.decode([i for i in ids[0].tolist() if i < sp.vocab_size])
    text_only = processor(text=["<LANG_FR><TRANSLATE>A dog on the grass."])
    assert text_only.input_ids.shape[1] < processor.num_image_tokens + 48
    assert model.generate(**text_only, max_new_tokens=4).shape[0] == 1


def test_missing_tokenizers_refuse_with_the_fix(run, world1, tmp_path):
    from mmcap.checkpoint.integrity import write_checksums

    root, data, save = run
    bare = shutil.copytree(save / (save / "latest").read_text().strip(), tmp_path / "bare")
    shutil.rmtree(bare / "inference")  # a checkpoint of an earlier release: no inference/
    write_checksums(bare)
    out = tmp_path / "hf"
    rc, text = _export(world1, ["--ckpt", str(bare), "--out", str(out)])
    assert rc == 1 and "carries no tokenizers" in text and "--tokenizers" in text, text
    assert "Traceback" not in text and not out.exists()
    rc, text = _export(world1, ["--ckpt", str(bare), "--out", str(out), "--tokenizers", str(tmp_path)])
    assert rc == 1 and "holds no tokenizers" in text and not out.exists(), text
    # The training data (or the original files) supply them; --weights-only opts out.
    rc, text = _export(world1, ["--ckpt", str(bare), "--out", str(out), "--tokenizers", str(data)])
    assert rc == 0 and (out / "decoder_tokenizer").is_dir(), text
    enc, gem = root / "tok" / "bart", root / "tok" / "gemma" / "tokenizer.model"
    argv = ["--ckpt", str(bare), "--out", str(tmp_path / "hf2")]
    rc, text = _export(world1, [*argv, "--encoder-tokenizer", str(enc), "--gemma-tokenizer", str(gem)])
    assert rc == 0 and (tmp_path / "hf2" / "processor_config.json").is_file(), text
    rc, text = _export(world1, ["--ckpt", str(bare), "--out", str(tmp_path / "hf3"), "--weights-only"])
    assert rc == 0 and not (tmp_path / "hf3" / "processor_config.json").exists(), text
