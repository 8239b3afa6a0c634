"""Which tokenizers a run stores in its checkpoints (mmcap.checkpoint.inference_assets): the
resumed checkpoint's, the dataset's copy, or checkpoint.load's, each only when it is the pair
the data was tokenized with (the manifest's sha256)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from mmcap.checkpoint.inference_assets import (
    find_run_tokenizers,
    inference_files,
    tokenizers_in,
    write_files,
)
from mmcap.config.presets import get_preset
from mmcap.data.config import BatchConfig
from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer
from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    gemma = build_tiny_gemma_tokenizer(d / "gemma", seed=0)
    renamed = d / "gemma" / "gemma2.model"  # the manifest records the original file name
    shutil.copyfile(gemma, renamed)
    other = build_tiny_gemma_tokenizer(d / "other", vocab_size=500, seed=1)
    bart = build_tiny_bart_tokenizer(d / "bart")
    return {"gemma": renamed, "other": other, "bart": bart}


def _dataset(root, toks, with_copy: bool):
    root.mkdir(parents=True)
    described = {
        "target": TargetTokenizer(toks["gemma"]).describe(),
        "prompt": PromptTokenizer(toks["bart"]).describe(),
    }
    (root / "manifest.json").write_text(json.dumps({"tokenizers": described}))
    if with_copy:
        from mmcap.checkpoint.inference_assets import TokenizerFiles

        write_files(root, TokenizerFiles(toks["bart"], toks["gemma"], "t").files("tokenizers/"))
    return root


def _converted(root, bart, gemma):
    """tools/convert_from_hf.py's layout: tokenizer/ + gemma/tokenizer.model."""
    shutil.copytree(bart, root / "tokenizer")
    (root / "gemma").mkdir()
    shutil.copyfile(gemma, root / "gemma" / "tokenizer.model")
    return root


def test_the_dataset_copy_then_checkpoint_load(toks, tmp_path):
    data = _dataset(tmp_path / "data", toks, with_copy=True)
    found = find_run_tokenizers([str(data)])
    assert found is not None and found.origin.endswith("(tokenizers/)")
    bare = _dataset(tmp_path / "bare", toks, with_copy=False)
    assert tokenizers_in(bare) is None
    load = _converted(tmp_path / "load", toks["bart"], toks["gemma"])
    found = find_run_tokenizers([str(bare)], load=load)
    assert found is not None and found.encoder_dir == load / "tokenizer"
    # A resumed run keeps what its checkpoint carries, ahead of everything else.
    files = inference_files(get_preset("debug-gemma"), BatchConfig(), found)
    ckpt = tmp_path / "step"
    write_files(ckpt, files)
    assert tokenizers_in(ckpt).origin.endswith("(inference/)")
    assert find_run_tokenizers([str(data)], load=load, resume=ckpt).encoder_dir.parent == ckpt / "inference"
    info = json.loads((ckpt / "inference" / "inference.json").read_text())
    assert info["image_size"] == 64 and info["max_prompt_tokens"] == 128
    assert info["prompts"]["language_modifiers"]["<LANG_ZH>"] == "The target language is simplified Chinese."
    assert info["tokenizers"]["sha256"]["prompt"] == PromptTokenizer(toks["bart"]).content_hash


def test_tokenizers_the_data_was_not_tokenized_with_are_not_stored(toks, tmp_path, caplog):
    bare = _dataset(tmp_path / "bare", toks, with_copy=False)
    wrong = _converted(tmp_path / "load", toks["bart"], toks["other"])
    with caplog.at_level(logging.WARNING):
        assert find_run_tokenizers([str(bare)], load=wrong) is None
    text = caplog.text
    assert "target tokenizer differs" in text and str(bare) in text
    assert "--tokenizers DIR" in text  # what the export will need
    assert inference_files(get_preset("debug-gemma"), BatchConfig(), None) == {}
