"""The demo dataset: real photographs and hand-written texts shipped in ``examples/demo/``.

``examples/demo/images/*.jpg`` are public-domain / CC0 photographs from scikit-image's bundled
sample data (and crops of them); ``examples/demo/texts.json`` holds, per image, captions in
en, de, es, zh and English sentences with translations to de, fr, es, zh, ru. From them:

- :func:`build_demo_sources`: official webdataset tars (SYSTEM.md "Data") in the paper's setup:
  train shards caption only in en and de and translate en -> {de, fr, es, zh, ru}, so es and
  zh are never seen as captions; a held-out eval shard (other images) holds every key of the
  SC / UC / ST splits. Plus a Gemma-like SentencePiece model and a BART-like byte-level BPE
  trained on the demo texts and prompts (no hub), sized for the ``debug-*`` presets.
- :func:`build_demo_dataset`: those sources, and optionally the indexed train / eval datasets
  made by :func:`mmcap.data.preprocess.preprocess`, under one folder that is complete only
  once its ``demo.json`` exists (``tools/make_demo_data.py``).
- :func:`export_demo_images`: regenerates the shipped JPEGs from scikit-image's data folder.

Everything is deterministic from the seed (it orders the train samples over the shards).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from mmcap.data.prompts import (
    CAPTION_TOKENS,
    LANG_MODIFIERS,
    ZERO_SHOT_PREFIXES,
    build_prompt,
    task_string,
)

DEMO_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo"
TEXTS_FILE = "texts.json"
DEMO_MANIFEST = "demo.json"
# The paper's pretraining mixture (SYSTEM.md "Data"): captions only in en and de, translation
# en -> {de, fr, es, zh, ru}. Eval holds exactly the keys of the SC / UC / ST splits.
TRAIN_CAPTION_LANGS = ("en", "de")
TRAIN_TRANSLATION_LANGS = ("de", "fr", "es", "zh", "ru")
EVAL_CAPTION_LANGS = ("en", "de", "es", "zh")
EVAL_TRANSLATION_LANGS = ("es", "zh")
# Vocabulary sizes of the debug presets (mmcap/config/presets.py: decoder and encoder 1000).
GEMMA_VOCAB_SIZE = 1000
ENCODER_VOCAB_SIZE = 1000
TRAIN_SHARDS = 2  # more than one, so multi-file preprocessing is exercised
IMAGE_LONGEST_SIDE = 256  # shipped JPEGs: small (the debug models see 64 px)
JPEG_QUALITY = 85


@dataclass(frozen=True)
class DemoImage:
    """One shipped image and its texts (an element of ``texts.json`` "images").

    Args:
        key: sample key and file stem (``images/{key}.jpg``).
        source: file in scikit-image's ``skimage/data`` it was made from.
        crop: ``[left, top, right, bottom]`` in source pixels, or None for the whole image.
        split: "train" or "eval".
        caption: language -> caption.
        translation: list of language -> sentence, each with "en" (the source).
    """

    key: str
    source: str
    crop: tuple[int, int, int, int] | None
    split: str
    caption: dict[str, str]
    translation: tuple[dict[str, str], ...]

    def path(self, demo_dir: Path) -> Path:
        return demo_dir / "images" / f"{self.key}.jpg"


def load_demo_texts(demo_dir: str | Path | None = None) -> tuple[list[DemoImage], dict]:
    """The images of ``texts.json`` (in file order) and its per-source licence table;
    ValueError names the image and field that is missing or wrong."""
    demo_dir = Path(demo_dir or DEMO_DIR)
    path = demo_dir / TEXTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: the demo data ships with the repository (examples/demo/)"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    sources, images, seen = raw["sources"], [], set()
    for item in raw["images"]:
        im = DemoImage(
            key=item["key"],
            source=item["source"],
            crop=tuple(item["crop"]) if item["crop"] else None,
            split=item["split"],
            caption=dict(item["caption"]),
            translation=tuple(dict(t) for t in item["translation"]),
        )
        where = f"{path}: image {im.key!r}"
        if im.key in seen or "." in im.key or "/" in im.key:
            raise ValueError(f"{where}: key must be unique, without '.' or '/'")
        seen.add(im.key)
        if im.source not in sources or "licence" not in sources[im.source]:
            raise ValueError(f"{where}: source {im.source!r} has no licence in 'sources'")
        if im.split not in ("train", "eval"):
            raise ValueError(f"{where}: split must be 'train' or 'eval', got {im.split!r}")
        if missing := set(EVAL_CAPTION_LANGS) - set(im.caption):
            raise ValueError(f"{where}: caption lacks {sorted(missing)}")
        need = {"en", *TRAIN_TRANSLATION_LANGS}
        if not im.translation or any(need - set(t) for t in im.translation):
            raise ValueError(f"{where}: every translation needs {sorted(need)}")
        images.append(im)
    return images, sources


def demo_entries(image: DemoImage, split: str) -> list[dict]:
    """Official ``.data`` entries of one image for ``split`` ("train" or "eval")."""
    cap_langs, tr_langs = (
        (TRAIN_CAPTION_LANGS, TRAIN_TRANSLATION_LANGS)
        if split == "train"
        else (EVAL_CAPTION_LANGS, EVAL_TRANSLATION_LANGS)
    )
    entries = [
        {
            "type": "caption",
            "lang": lang,
            "prompt": task_string("caption", lang),
            "output": image.caption[lang],
        }
        for lang in cap_langs
    ]
    for pair in image.translation:
        entries += [
            {
                "type": "translation",
                "lang": lang,
                "prompt": task_string("translation", lang, pair["en"]),
                "output": pair[lang],
            }
            for lang in tr_langs
        ]
    return entries


def demo_corpus(images: list[DemoImage]) -> list[str]:
    """Tokenizer training text: every caption and sentence, the encoder prompt of every entry
    of both splits, all modifier x caption-task prompts and the zero-shot prefixes."""
    lines = [t for im in images for t in im.caption.values()]
    lines += [t for im in images for pair in im.translation for t in pair.values()]
    for im in images:
        for split in ("train", "eval"):
            lines += [build_prompt(e["prompt"]) for e in demo_entries(im, split)]
    lines += [build_prompt(m + t) for m in LANG_MODIFIERS for t in CAPTION_TOKENS]
    lines += list(ZERO_SHOT_PREFIXES.values())
    return lines


def build_demo_gemma_tokenizer(out_dir: str | Path, corpus: list[str]) -> Path:
    """SentencePiece BPE of exactly :data:`GEMMA_VOCAB_SIZE` pieces on ``corpus``
    (:func:`mmcap.data.testing.build_tiny_gemma_tokenizer`); returns the model path."""
    from mmcap.data.testing import build_tiny_gemma_tokenizer

    return build_tiny_gemma_tokenizer(out_dir, GEMMA_VOCAB_SIZE, corpus=corpus)


def build_demo_encoder_tokenizer(out_dir: str | Path, corpus: list[str]) -> Path:
    """Byte-level BPE of at most :data:`ENCODER_VOCAB_SIZE` tokens on ``corpus``, BART layout
    (:func:`mmcap.data.testing.build_tiny_bart_tokenizer`); returns the directory."""
    from mmcap.data.testing import build_tiny_bart_tokenizer

    return build_tiny_bart_tokenizer(out_dir, ENCODER_VOCAB_SIZE, corpus=corpus)


def demo_source_paths(root: str | Path) -> dict:
    """Where :func:`build_demo_sources` puts its files under ``root``."""
    root = Path(root)
    return {
        "train": [str(root / f"demo-train-{s:03d}.tar") for s in range(TRAIN_SHARDS)],
        "eval": [str(root / "demo-eval-000.tar")],
        "gemma_tokenizer": str(root / "tokenizers" / "gemma" / "tokenizer.model"),
        "encoder_tokenizer": str(root / "tokenizers" / "encoder"),
    }


def build_demo_sources(
    out_dir: str | Path, seed: int = 0, demo_dir: str | Path | None = None
) -> dict:
    """Write the demo's official tars and tokenizers into ``out_dir``.

    Args:
        out_dir: output folder (created; existing files of the same names are replaced).
        seed: orders the train images over the :data:`TRAIN_SHARDS` train shards.
        demo_dir: folder with ``texts.json`` and ``images/`` (default: ``examples/demo``).

    Returns:
        {"train": [tar paths], "eval": [tar path], "gemma_tokenizer": tokenizer.model path,
        "encoder_tokenizer": tokenizer directory}, all as strings.
    """
    from mmcap.data.testing import write_official_tar

    demo_dir = Path(demo_dir or DEMO_DIR)
    images, _ = load_demo_texts(demo_dir)
    paths = demo_source_paths(out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def sample(im: DemoImage, split: str) -> tuple[str, bytes, bytes]:
        data = json.dumps(demo_entries(im, split), ensure_ascii=False).encode("utf-8")
        return im.key, im.path(demo_dir).read_bytes(), data

    train = [im for im in images if im.split == "train"]
    random.Random(seed).shuffle(train)
    for s, path in enumerate(paths["train"]):
        write_official_tar(path, [sample(im, "train") for im in train[s::TRAIN_SHARDS]])
    held_out = [im for im in images if im.split == "eval"]
    write_official_tar(paths["eval"][0], [sample(im, "eval") for im in held_out])

    corpus = demo_corpus(images)
    build_demo_gemma_tokenizer(Path(paths["gemma_tokenizer"]).parent, corpus)
    build_demo_encoder_tokenizer(paths["encoder_tokenizer"], corpus)
    return paths


def _is_complete(root: Path) -> bool:
    return (root / DEMO_MANIFEST).is_file()


def build_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    preprocess: bool = True,
    overwrite: bool = False,
    demo_dir: str | Path | None = None,
) -> dict:
    """Sources (``OUT/sources``) and, with ``preprocess``, indexed datasets (``OUT/train``,
    ``OUT/eval``) of the demo; returns the contents of ``OUT/demo.json`` with absolute paths.

    ``OUT`` counts as complete once ``demo.json`` is written, last; an incomplete ``OUT`` (an
    interrupted run) is started over (it takes seconds). The sources are built in
    ``OUT/sources.partial`` and renamed; each dataset is atomic by itself
    (:func:`mmcap.data.preprocess.preprocess`). A complete ``OUT`` with the same seed is left
    as it is (datasets are added if asked for and missing); ``overwrite`` rebuilds it.
    """
    from mmcap.data.manifest import write_json_durable

    root = Path(out_dir).resolve()
    if overwrite and root.exists():
        shutil.rmtree(root)
    if _is_complete(root):
        info = json.loads((root / DEMO_MANIFEST).read_text())
        if info["seed"] != seed:
            raise FileExistsError(
                f"{root} holds the demo built with seed {info['seed']}, not {seed}; "
                "pass overwrite (--overwrite) to rebuild it"
            )
        if info["datasets"] or not preprocess:
            return _absolute(root, info)
        (root / DEMO_MANIFEST).unlink()  # add the datasets; complete again below
    elif root.exists():
        allowed = {"sources", "sources.partial", "train", "train.partial", "eval", "eval.partial"}
        stray = sorted(p.name for p in root.iterdir() if p.name not in allowed)
        if stray:
            raise FileExistsError(
                f"{root} exists and is not a demo dataset (holds {stray[:5]}); remove it or "
                "pass overwrite (--overwrite)"
            )
        shutil.rmtree(root)  # an interrupted build: its seed is unknown, start over
    root.mkdir(parents=True, exist_ok=True)

    sources = root / "sources"
    if not sources.exists():
        partial = root / "sources.partial"
        build_demo_sources(partial, seed=seed, demo_dir=demo_dir)
        partial.rename(sources)
    paths = demo_source_paths(sources)

    info = {"seed": seed, "sources": _relative(root, paths), "datasets": {}, "per_key": {}}
    if preprocess:
        from mmcap.data.preprocess import preprocess as run_preprocess

        for split in ("train", "eval"):
            out = root / split
            if (out / "manifest.json").exists():
                manifest = json.loads((out / "manifest.json").read_text())
            else:
                manifest = run_preprocess(
                    paths[split],
                    paths["gemma_tokenizer"],
                    paths["encoder_tokenizer"],
                    str(out),
                    show_progress=False,
                )
            info["datasets"][split] = split
            info["per_key"][split] = manifest["per_key"]
            info.setdefault("counts", {})[split] = manifest["counts"]
            info.setdefault("rejects", {})[split] = sum(manifest["rejects"].values())
    write_json_durable(root / DEMO_MANIFEST, info)
    return _absolute(root, info)


def _relative(root: Path, paths: dict) -> dict:
    def rel(p: str) -> str:
        return str(Path(p).relative_to(root))

    return {k: [rel(p) for p in v] if isinstance(v, list) else rel(v) for k, v in paths.items()}


def _absolute(root: Path, info: dict) -> dict:
    def absolute(p: str) -> str:
        return str(root / p)

    out = dict(info, root=str(root))
    out["sources"] = {
        k: [absolute(p) for p in v] if isinstance(v, list) else absolute(v)
        for k, v in info["sources"].items()
    }
    out["datasets"] = {k: absolute(v) for k, v in info["datasets"].items()}
    return out


def export_demo_images(
    skimage_data_dir: str | Path, demo_dir: str | Path | None = None
) -> list[Path]:
    """Regenerate ``images/*.jpg`` from scikit-image's bundled sample files (the
    ``skimage/data`` folder of the scikit-image 0.26.0 wheel): crop, convert to RGB, resize
    (Lanczos) to a longest side of :data:`IMAGE_LONGEST_SIDE`, JPEG quality
    :data:`JPEG_QUALITY`, no metadata. Returns the written paths."""
    from PIL import Image

    demo_dir = Path(demo_dir or DEMO_DIR)
    data_dir = Path(skimage_data_dir)
    images, _ = load_demo_texts(demo_dir)
    (demo_dir / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for im in images:
        src = data_dir / im.source
        if not src.is_file():
            raise FileNotFoundError(f"{src} (source of {im.key!r}) does not exist")
        with Image.open(src) as pil:
            rgb = pil.convert("RGB")
        if im.crop:
            rgb = rgb.crop(im.crop)
        scale = IMAGE_LONGEST_SIDE / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        path = im.path(demo_dir)
        path.write_bytes(buf.getvalue())
        written.append(path)
    return written
