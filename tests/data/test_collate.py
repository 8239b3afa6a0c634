"""Token batches: padding, shift-right with start token 1, ignore index; end-to-end loader."""

import numpy as np
import pytest
import torch

from mmcap.data.collate import collate_tokens, collate_tokens_ref
from mmcap.data.config import BatchConfig, ImageConfig, SamplerConfig
from mmcap.data.images import PILDecoder
from mmcap.data.indexed import CaptionDataset
from mmcap.data.loader import TokenBatchAssembler, iterate_batches
from mmcap.data.preprocess import preprocess
from mmcap.data.sampler import GroupIndex, TaskLangSampler
from tests.data.test_preprocess import _official_shards


def test_shift_and_padding_by_hand():
    cfg = BatchConfig(max_prompt_tokens=8, max_target_tokens=6, pad_multiple=4)
    b = collate_tokens(
        [np.array([0, 11, 12, 2]), np.array([0, 13, 2])],
        [np.array([2, 21, 22, 1]), np.array([2, 23, 24, 25, 26, 27, 1])],
        cfg,
    )
    assert b.encoder_input_ids.tolist() == [[0, 11, 12, 2], [0, 13, 2, 1]]  # BART <pad> = 1
    assert b.encoder_attention_mask.tolist() == [[True] * 4, [True] * 3 + [False]]
    # Second target cropped to 6 (its <eos> is cut, as the official loader's crop does).
    assert b.labels.tolist() == [[2, 21, 22, 1, -100, -100], [2, 23, 24, 25, 26, 27]]
    assert b.decoder_input_ids.tolist() == [[1, 2, 21, 22, 0, 0], [1, 2, 23, 24, 25, 26]]
    assert b.decoder_attention_mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert b.labels.dtype == torch.int64 and b.encoder_attention_mask.dtype == torch.bool


def test_crop_keeping_eos_is_the_tokenizer_truncation(loaded_tokenizers):
    """keep_eos_on_crop = Hugging Face ``truncation=True, max_length=L`` (the official CE
    eval's prompt crop to 447 tokens), on the BART tokenizer itself."""
    _, prompt = loaded_tokenizers
    text = "The target language is German. Translate the following text: " + "a red car " * 30
    full = prompt.encode([text])[0]
    for n in (5, 17, len(full) - 1, len(full), len(full) + 3):
        want = prompt.tok(text, truncation=True, max_length=n)["input_ids"]
        cfg = BatchConfig(max_prompt_tokens=n, max_target_tokens=4, keep_eos_on_crop=True)
        b = collate_tokens([full], [np.array([2, 5, 1])], cfg)
        assert b.encoder_input_ids[0][b.encoder_attention_mask[0]].tolist() == want, n
    b = collate_tokens([full], [np.array([2, 5, 6, 7, 1])], cfg)  # target cropped to 4
    assert b.labels.tolist() == [[2, 5, 6, 1]]
    assert b.decoder_input_ids.tolist() == [[1, 2, 5, 6]]


@pytest.mark.parametrize(
    "pad_to, multiple, keep_eos",
    [("longest", 8, False), ("longest", 1, False), ("max", 8, False), ("longest", 8, True)],
)
def test_matches_reference_on_random_batches(pad_to, multiple, keep_eos):
    rng = np.random.default_rng(0)
    cfg = BatchConfig(
        max_prompt_tokens=40,
        max_target_tokens=24,
        pad_to=pad_to,
        pad_multiple=multiple,
        keep_eos_on_crop=keep_eos,
    )
    for _ in range(20):
        n = int(rng.integers(1, 9))
        prompts = [rng.integers(3, 500, rng.integers(1, 60)) for _ in range(n)]
        targets = [rng.integers(3, 500, rng.integers(1, 40)) for _ in range(n)]
        got = collate_tokens(prompts, targets, cfg)
        ref = collate_tokens_ref([p.tolist() for p in prompts], [t.tolist() for t in targets], cfg)
        for name, value in ref.items():
            assert getattr(got, name).tolist() == value, name
        if pad_to == "max":
            assert got.labels.shape == (n, 24) and got.encoder_input_ids.shape == (n, 40)
        else:
            assert got.labels.shape[1] % multiple == 0 or got.labels.shape[1] == 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_tokenizers):
    root = tmp_path_factory.mktemp("loader")
    _official_shards(root, n_shards=2, per_shard=6, seed=3)
    preprocess([str(root / "shard-*.tar")], *tiny_tokenizers, str(root / "ds"), show_progress=False)
    return CaptionDataset(root / "ds")


def test_token_batches_from_an_indexed_dataset(dataset):
    cfg = BatchConfig(max_prompt_tokens=32, max_target_tokens=16)
    sampler = TaskLangSampler(
        [GroupIndex.from_dataset(dataset)], SamplerConfig(global_batch_size=8)
    )
    assemble = TokenBatchAssembler([dataset], cfg)
    for _ in range(4):
        gb = sampler.next_batch()
        batch = assemble(gb)
        for i, row in enumerate(batch.entry.tolist()):
            t = dataset.target_ids(row)[:16]
            p = dataset.prompt_ids(row)[:32]
            labels = batch.tokens.labels[i]
            assert labels[: len(t)].tolist() == t.tolist() and (labels[len(t) :] == -100).all()
            assert batch.tokens.decoder_input_ids[i, : len(t)].tolist() == [1] + t[:-1].tolist()
            assert batch.tokens.encoder_input_ids[i, : len(p)].tolist() == p.tolist()
            assert batch.image[i] == dataset.entries["image"][row]
            assert batch.key[i] == dataset.entries["key"][row]


@pytest.mark.parametrize("workers", [0, 1])
def test_pixels_from_dataloader_workers(dataset, workers):
    image_cfg = ImageConfig(size=32, backend="pil")
    sampler = TaskLangSampler(
        [GroupIndex.from_dataset(dataset)], SamplerConfig(global_batch_size=6)
    )
    it = iterate_batches(
        [dataset],
        sampler,
        BatchConfig(),
        image_cfg,
        num_workers=workers,
        multiprocessing_context="forkserver",
    )
    decoder = PILDecoder(image_cfg)
    for step in range(3):
        batch = next(it)
        assert batch.step == step and batch.pixels.shape == (6, 3, 32, 32)
        expect = decoder([dataset.image_bytes(int(r)) for r in batch.image])
        torch.testing.assert_close(batch.pixels, expect, rtol=0, atol=0)
        assert batch.has_image.all()
