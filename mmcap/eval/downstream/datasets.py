"""Readers of the downstream evaluation datasets in the official layouts (``--data-root``).

The layouts are the official eval's (src/eval.py of the paper's code), under one root:

- Multi30K (``multi30k/``): task 1 ``data/task1/raw/{split}.{lang}.gz`` (one sentence per
  image and line) and ``data/task1/image_splits/{split}.txt`` (image file names); task 2
  ``data/task2/raw/test_2016.{1..5}.{lang}.gz`` (five captions per image) and
  ``data/task2/image_splits/test_2016_images.txt``. Images: ``multi30k/flickr30k-images/``
  (test_2016), ``multi30k/task1_test_2017/``, ``multi30k/task1_test_2018/``, and for
  test_2017_mscoco ``coco/{train2014|val2014}/NAME`` (the split file's ``NAME#n`` cut at ``#``).
- XM3600 (``xm3600/``): ``captions.jsonl``, one image per line
  ``{"image/key": K, "<lang>": {"caption": [...]}, ...}``; images ``images/K.jpg``.
- CoMMuTE (``CoMMuTE/``): ``CoMMuTE/en-{lang}/{img.order, src.en, correct.{lang},
  incorrect.{lang}}`` (parallel lines); images ``images/NAME`` (``img.order`` lines).
- COCO Karpathy (``coco/``): ``annotations/coco_karpathy.json`` (``{"images": [{"split",
  "filename", "sentences": [{"raw"}]}]}``), images ``{train2014|val2014}/filename``.

A missing annotation file raises :class:`DatasetMissingError` naming it; malformed content
(unequal line counts, bad JSON, a missing field) raises ValueError naming file, line and
field. Image files are not opened here (the runner skips undecodable ones, counted).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

MULTI30K_TASK1_SPLITS = (
    "test_2016_flickr",
    "test_2017_flickr",
    "test_2018_flickr",
    "test_2017_mscoco",
)
XM3600_LANGS = ("en", "de", "fr", "es", "ru", "zh")
COMMUTE_LANGS = ("de", "fr", "ru", "zh")


class DatasetMissingError(FileNotFoundError):
    """An annotation file of a downstream dataset does not exist (``path`` names it)."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        super().__init__(f"{what}: missing file {self.path}")


@dataclass(frozen=True)
class Sample:
    """One evaluation item.

    Args:
        id: unique within its task (the image name, or ``"line N"``).
        image: image file (always set: every official task is image-conditioned).
        references: reference texts (translation: one; captioning: all of the image's).
        source: English source sentence (translation and ambiguity), else None.
        incorrect: CoMMuTE's incorrect translation (ambiguity), else None.
    """

    id: str
    image: Path
    references: tuple[str, ...]
    source: str | None = None
    incorrect: str | None = None


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetMissingError(path, what)
    return path


def _lines(path: Path, what: str) -> list[str]:
    _need(path, what)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\r\n").strip() for line in f]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{what}: cannot read {path} ({e})") from e


def _same_length(what: str, files: dict[Path, list]) -> int:
    counts = {p: len(v) for p, v in files.items()}
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{p.name}: {n}" for p, n in counts.items())
        raise ValueError(f"{what}: files have different line counts ({listed})")
    return next(iter(counts.values()))


def multi30k_task1(root: Path, split: str, lang: str) -> list[Sample]:
    """Multi30K task 1 (translation en -> ``lang``) of one test split."""
    if split not in MULTI30K_TASK1_SPLITS or lang not in ("de", "fr"):
        raise ValueError(f"Multi30K task 1: unsupported split/lang {split}/{lang}")
    what = f"Multi30K task1 {split} {lang}"
    base = Path(root) / "multi30k"
    src_f = base / "data/task1/raw" / f"{split}.en.gz"
    tgt_f = base / "data/task1/raw" / f"{split}.{lang}.gz"
    img_f = base / "data/task1/image_splits" / f"{split}.txt"
    src, tgt, names = _lines(src_f, what), _lines(tgt_f, what), _lines(img_f, what)
    _same_length(what, {src_f: src, tgt_f: tgt, img_f: names})
    image_dirs = {
        "test_2016_flickr": base / "flickr30k-images",
        "test_2017_flickr": base / "task1_test_2017",
        "test_2018_flickr": base / "task1_test_2018",
    }
    out = []
    for i, (s, t, name) in enumerate(zip(src, tgt, names, strict=True)):
        if split == "test_2017_mscoco":
            name = name.split("#")[0]
            sub = "train2014" if "train2014" in name else "val2014"
            image = Path(root) / "coco" / sub / name
        else:
            image = image_dirs[split] / name
        out.append(Sample(id=f"{i}:{name}", image=image, references=(t,), source=s))
    return out


def multi30k_task2(root: Path, lang: str) -> list[Sample]:
    """Multi30K task 2 test_2016 captioning in ``lang`` (en, de): five captions per image."""
    if lang not in ("en", "de"):
        raise ValueError(f"Multi30K task 2: unsupported lang {lang}")
    what = f"Multi30K task2 test_2016 {lang}"
    base = Path(root) / "multi30k"
    cap_fs = [base / "data/task2/raw" / f"test_2016.{k}.{lang}.gz" for k in range(1, 6)]
    img_f = base / "data/task2/image_splits" / "test_2016_images.txt"
    caps = {f: _lines(f, what) for f in cap_fs}
    names = _lines(img_f, what)
    _same_length(what, {**caps, img_f: names})
    per_image = list(zip(*caps.values(), strict=True))
    return [
        Sample(id=f"{i}:{name}", image=base / "flickr30k-images" / name, references=tuple(refs))
        for i, (name, refs) in enumerate(zip(names, per_image, strict=True))
    ]


def xm3600(root: Path, lang: str) -> list[Sample]:
    """XM3600 captioning in ``lang`` (all of the image's ``lang`` captions as references)."""
    what = f"XM3600 {lang}"
    base = Path(root) / "xm3600"
    path = _need(base / "captions.jsonl", what)
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from e
            key = rec.get("image/key") if isinstance(rec, dict) else None
            if not isinstance(key, str) or not key:
                raise ValueError(f"{path}:{n}: field 'image/key' missing or not a string")
            caps = rec.get(lang, {})
            caps = caps.get("caption") if isinstance(caps, dict) else None
            if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
                raise ValueError(
                    f"{path}:{n}: field '{lang}.caption' missing or not a list of text"
                )
            refs = tuple(c.strip() for c in caps)
            out.append(Sample(id=key, image=base / "images" / f"{key}.jpg", references=refs))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def commute(root: Path, lang: str) -> list[Sample]:
    """CoMMuTE en -> ``lang``: source, correct (the reference) and incorrect translation."""
    if lang not in COMMUTE_LANGS:
        raise ValueError(f"CoMMuTE: unsupported lang {lang}")
    what = f"CoMMuTE en-{lang}"
    base = Path(root) / "CoMMuTE"
    d = base / "CoMMuTE" / f"en-{lang}"
    files = [d / "img.order", d / "src.en", d / f"correct.{lang}", d / f"incorrect.{lang}"]
    cols = {f: _lines(f, what) for f in files}
    _same_length(what, cols)
    out = []
    for i, (img, src, good, bad) in enumerate(zip(*cols.values(), strict=True)):
        out.append(
            Sample(
                id=f"{i}:{img}",
                image=base / "images" / img,
                references=(good,),
                source=src,
                incorrect=bad,
            )
        )
    return out


def coco_karpathy(root: Path, split: str = "test") -> list[Sample]:
    """COCO Karpathy ``split`` (English captions; all of the image's as references)."""
    base = Path(root) / "coco"
    path = _need(base / "annotations" / "coco_karpathy.json", "COCO Karpathy")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        images = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Karpathy split file with 'images' ({e!r})") from e
    by_name: dict[str, tuple[str, ...]] = {}  # official: a dict by file name
    for n, img in enumerate(images):
        try:
            if img["split"] != split:
                continue
            by_name[img["filename"]] = tuple(s["raw"].strip() for s in img["sentences"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: images[{n}]: field {e} missing or malformed") from e
    out = [
        Sample(
            id=name,
            image=base / ("train2014" if "train2014" in name else "val2014") / name,
            references=refs,
        )
        for name, refs in by_name.items()
    ]
    if not out:
        raise ValueError(f"{path}: no images in split {split!r}")
    return out
