"""The shipped demo data: real JPEGs and texts -> official tars -> indexed datasets in the
paper's setup (es / zh captions only in the held-out eval shard), with no rejects."""

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from mmcap.data.demo import (
    DEMO_DIR,
    DEMO_MANIFEST,
    EVAL_CAPTION_LANGS,
    EVAL_TRANSLATION_LANGS,
    GEMMA_VOCAB_SIZE,
    IMAGE_LONGEST_SIDE,
    TRAIN_CAPTION_LANGS,
    TRAIN_TRANSLATION_LANGS,
    build_demo_dataset,
    build_demo_sources,
    load_demo_texts,
)
from mmcap.data.records import check_jpeg
from mmcap.eval.results import SPLITS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0, preprocess=True)


def _expected_per_key(split: str) -> Counter:
    images, _ = load_demo_texts()
    cap, tr = (
        (TRAIN_CAPTION_LANGS, TRAIN_TRANSLATION_LANGS)
        if split == "train"
        else (EVAL_CAPTION_LANGS, EVAL_TRANSLATION_LANGS)
    )
    want = Counter()
    for im in images:
        if im.split == split:
            want.update({f"caption-{lang}": 1 for lang in cap})
            want.update({f"translation-{lang}": len(im.translation) for lang in tr})
    return want


def test_counts_per_key_follow_the_paper_setup(demo):
    train, held_out = demo["per_key"]["train"], demo["per_key"]["eval"]
    assert train == _expected_per_key("train")
    assert held_out == _expected_per_key("eval")
    # Unseen captioning: es / zh captions never in training, but their translations are.
    assert {"caption-es", "caption-zh"}.isdisjoint(train)
    assert {"translation-es", "translation-zh"} <= set(train)
    assert set(held_out) == {k for keys in SPLITS.values() for k in keys}
    assert demo["rejects"] == {"train": 0, "eval": 0}
    for split in ("train", "eval"):
        assert (Path(demo["datasets"][split]) / "rejects.jsonl").read_text() == ""


def test_eval_images_are_held_out(demo):
    def keys(paths):
        with_names = []
        for p in paths:
            with tarfile.open(p) as tar:
                with_names += [m.name.split(".")[0] for m in tar if m.name.endswith(".jpg")]
        return with_names

    train, held_out = keys(demo["sources"]["train"]), keys(demo["sources"]["eval"])
    assert len(train) == len(set(train)) and held_out and set(train).isdisjoint(held_out)
    assert len(train) + len(held_out) == len(load_demo_texts()[0])


def test_tokenizers_round_trip_and_fit_the_debug_vocabularies(demo):
    from mmcap.data.indexed import CaptionDataset
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer

    target = TargetTokenizer(demo["sources"]["gemma_tokenizer"])
    prompt = PromptTokenizer(demo["sources"]["encoder_tokenizer"])
    assert target.vocab_size == GEMMA_VOCAB_SIZE and prompt.vocab_size <= 1000
    images, _ = load_demo_texts()
    for text in (images[0].caption["zh"], images[0].caption["de"], "鳄鱼 ünseen"):
        assert target.decode(target.encode([text])[0]) == text  # byte fallback: any text
        assert prompt.decode(prompt.encode([text])[0]) == text
    for split in ("train", "eval"):
        ds = CaptionDataset(demo["datasets"][split])
        assert max(int(ds.target_ids(i).max()) for i in range(len(ds))) < 1000
        assert max(int(ds.prompt_ids(i).max()) for i in range(len(ds))) < 1000


def test_every_shipped_image_decodes_and_has_a_licence():
    from PIL import Image

    images, sources = load_demo_texts()
    assert len(images) >= 30
    total = 0
    for im in images:
        data = im.path(DEMO_DIR).read_bytes()
        total += len(data)
        assert check_jpeg(data) is None, im.key
        with Image.open(io.BytesIO(data)) as pil:
            pil.load()
            assert pil.mode == "RGB" and max(pil.size) == IMAGE_LONGEST_SIDE, im.key
        assert sources[im.source]["licence"], im.source
    assert total < 1.5e6


def test_sources_are_deterministic(tmp_path):
    def digest(paths):
        files = sorted(Path(p) for v in paths.values() for p in (v if isinstance(v, list) else [v]))
        files = [f for p in files for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    a = build_demo_sources(tmp_path / "a", seed=0)
    b = build_demo_sources(tmp_path / "b", seed=0)
    assert digest(a) == digest(b)


def test_rebuild_is_a_no_op_unless_overwrite(demo):
    root = Path(demo["root"])
    stamp = (root / DEMO_MANIFEST).stat().st_mtime_ns
    assert build_demo_dataset(root, seed=0) == demo
    assert (root / DEMO_MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="seed"):
        build_demo_dataset(root, seed=1)
    info = json.loads((root / DEMO_MANIFEST).read_text())
    assert info["datasets"] == {"train": "train", "eval": "eval"}  # stored relative


def test_interrupted_build_starts_over(tmp_path):
    root = tmp_path / "demo"
    (root / "sources.partial").mkdir(parents=True)
    (root / "sources.partial" / "demo-train-000.tar").write_bytes(b"truncated")
    info = build_demo_dataset(root, preprocess=False)
    assert sorted(p.name for p in root.iterdir()) == [DEMO_MANIFEST, "sources"]
    assert info["datasets"] == {} and all(Path(p).is_file() for p in info["sources"]["train"])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo dataset"):
        build_demo_dataset(tmp_path / "other")
