"""MmcapCaptionerProcessor: task strings + images -> encoder inputs as mmcap builds them.

Tiny tokenizers are trained locally (mmcap.data.testing); the Gemma one is turned into a
transformers ``GemmaTokenizer`` from the SentencePiece pieces (no protobuf needed).
"""

import io

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, GemmaTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

import mmcap.hf.register  # noqa: F401  (AutoProcessor)
from mmcap.data.prompts import build_prompt
from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer, make_jpeg
from mmcap.hf.processing_mmcap import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MmcapCaptionerProcessor,
    build_image_processor,
    num_image_tokens_for,
)
from mmcap.testing.hf_models import tiny_florence2
from tests.hf._tiny import IMAGE_SIZE, N_IMAGE_TOKENS, florence_family

TASKS = ["<LANG_DE><CAPTION>", "<LANG_FR><TRANSLATE>A dog on the grass with a red car."]
TARGETS = ["Das Bild zeigt einen Hund.", "Un chien sur herbe."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return build_tiny_gemma_tokenizer(root / "gemma"), build_tiny_bart_tokenizer(root / "bart")


@pytest.fixture(scope="module")
def processor(files):
    gemma_model, bart_dir = files
    vocab, _, merges = SentencePieceExtractor(str(gemma_model)).extract()
    return MmcapCaptionerProcessor(
        build_image_processor(IMAGE_SIZE),
        AutoTokenizer.from_pretrained(bart_dir),
        GemmaTokenizer(vocab=vocab, merges=merges),
        image_token_id=999,
    )


@pytest.fixture(scope="module")
def images():
    return [Image.open(io.BytesIO(make_jpeg(i, (90, 70)))) for i in range(2)]


def test_image_token_count():
    assert (num_image_tokens_for(224), num_image_tokens_for(768)) == (50, 577)
    assert num_image_tokens_for(IMAGE_SIZE) == N_IMAGE_TOKENS


def test_inputs_layout(processor, files, images):
    out = processor(images=images, text=TASKS, targets=TARGETS)
    bart = AutoTokenizer.from_pretrained(files[1])
    for i, task in enumerate(TASKS):
        prompt = bart(build_prompt(task))["input_ids"]  # <s> ... </s>
        assert prompt[0] == bart.bos_token_id and prompt[-1] == bart.eos_token_id
        row, mask = out.input_ids[i], out.attention_mask[i]
        assert (row[:N_IMAGE_TOKENS] == 999).all()
        n = N_IMAGE_TOKENS + len(prompt)
        assert row[N_IMAGE_TOKENS:n].tolist() == prompt
        assert (row[n:] == bart.pad_token_id).all() and mask.tolist() == [1] * n + [0] * (
            len(row) - n
        )
    # Targets: Gemma <bos> pieces <eos>, -100 padding; same ids as SentencePiece itself.
    sp = spm.SentencePieceProcessor(model_file=str(files[0]))
    for i, t in enumerate(TARGETS):
        want = [2, *sp.encode(t), 1]
        assert out.labels[i, : len(want)].tolist() == want
        assert (out.labels[i, len(want) :] == -100).all()
    cropped = processor(images=images, text=TASKS, max_prompt_tokens=4)
    assert cropped.input_ids.shape == (2, N_IMAGE_TOKENS + 4)
    assert cropped.input_ids[:, N_IMAGE_TOKENS:].tolist() == [p[:4] for p in out_prompts(files)]
    placeholders = processor(text=TASKS, image_placeholders=True)  # pixels passed separately
    assert (placeholders.input_ids[:, :N_IMAGE_TOKENS] == 999).all()
    assert "pixel_values" not in placeholders


def out_prompts(files) -> list[list[int]]:
    bart = AutoTokenizer.from_pretrained(files[1])
    return [bart(build_prompt(t))["input_ids"] for t in TASKS]


# The standard kwargs, each compared with what the BART tokenizer itself returns for the
# prompt texts (a Hugging Face processor's text part is its tokenizer's output).
KWARGS = [
    {},
    {"padding": True},
    {"padding": "longest", "return_tensors": "np"},
    {"padding": "max_length", "max_length": 96},
    {"padding": True, "truncation": True, "max_length": 6},
    {"padding": False, "return_tensors": None},
    {"padding": "max_length", "max_length": 96, "return_tensors": None},
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_text_only_inputs_match_the_tokenizer(processor, files, kwargs):
    bart = AutoTokenizer.from_pretrained(files[1])
    tensors = kwargs.get("return_tensors", "pt")
    want = bart([build_prompt(t) for t in TASKS], **{"padding": True, "return_tensors": "pt", **kwargs})
    got = processor(text=TASKS, **kwargs)
    assert set(got) == {"input_ids", "attention_mask"}  # no image placeholders, no pixels
    for k in ("input_ids", "attention_mask"):
        assert type(got[k]) is type(want[k])
        if tensors is None:
            assert got[k] == want[k]
        else:
            assert np.array_equal(np.asarray(got[k]), np.asarray(want[k]))


@pytest.mark.parametrize("kwargs", KWARGS[1:5], ids=str)
def test_kwargs_with_images_pad_the_prompt_behind_the_placeholders(processor, files, images, kwargs):
    bart = AutoTokenizer.from_pretrained(files[1])
    want = bart([build_prompt(t) for t in TASKS], **{"return_tensors": "pt", **kwargs})
    got = processor(images=images, text=TASKS, **kwargs)
    ids = np.asarray(got["input_ids"])
    assert (ids[:, :N_IMAGE_TOKENS] == 999).all()
    assert np.array_equal(ids[:, N_IMAGE_TOKENS:], np.asarray(want["input_ids"]))
    assert np.array_equal(np.asarray(got["attention_mask"])[:, N_IMAGE_TOKENS:], np.asarray(want["attention_mask"]))
    assert np.asarray(got["pixel_values"]).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_unpadded_tensors_and_bad_kwargs_are_refused(processor, images):
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=TASKS, padding=False)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text=TASKS, return_tensors="tf")
    with pytest.raises(ValueError, match="drop them"):
        processor(images=images, text=TASKS, image_placeholders=False)
    lists = processor(text=TASKS, targets=TARGETS, padding=False, return_tensors=None)
    assert [len(x) for x in lists["labels"]] == [len(x) + 2 for x in processor.decoder_tokenizer(TARGETS, add_special_tokens=False)["input_ids"]]
    assert all(-100 not in x for x in lists["labels"])  # unpadded labels


def test_pixel_values_match_official_transform(processor, images):
    pixel = processor(images=images, text=TASKS).pixel_values
    assert pixel.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, im in enumerate(images):
        x = np.asarray(im.convert("RGB").resize((IMAGE_SIZE,) * 2, Image.BICUBIC), np.float32)
        x = (x / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        ref = torch.from_numpy(x).permute(2, 0, 1).float()
        assert (pixel[i] - ref).abs().max().item() <= 1e-5


def test_save_load_and_generate_end_to_end(processor, images, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "decoder_tokenizer").is_dir()
    model = florence_family(tiny_florence2(seed=0))
    model.save_pretrained(tmp_path)  # an exported directory: model, config and processor
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MmcapCaptionerProcessor
    a, b = processor(images=images, text=TASKS), loaded(images=images, text=TASKS)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.num_image_tokens == N_IMAGE_TOKENS and loaded.image_token_id == 999
    out = model.generate(**a, max_new_tokens=6, num_beams=4)
    texts = loaded.batch_decode(out)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = [2, *loaded.decoder_tokenizer("Das Bild", add_special_tokens=False)["input_ids"], 1]
    assert loaded.decode(ids) == "Das Bild"
    # Text-only translation: no image, the prompt alone; the model encodes it without pixels.
    text = loaded(text=[TASKS[1]])
    assert text.input_ids.shape[1] == len(out_prompts_of(loaded, TASKS[1]))
    out = model.generate(**text, max_new_tokens=6, num_beams=2)
    assert out.shape[0] == 1 and isinstance(loaded.batch_decode(out)[0], str)


def out_prompts_of(proc, task: str) -> list[int]:
    return proc.tokenizer(build_prompt(task))["input_ids"]
