"""Tiny fake downstream datasets in the official layouts (:mod:`mmcap.eval.downstream.datasets`),
for tests: every task of the ``full`` set has ``n`` samples with small random images and
short made-up texts."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from mmcap.eval.downstream.datasets import COMMUTE_LANGS, MULTI30K_TASK1_SPLITS, XM3600_LANGS

_WORDS = {
    "en": "a dog cat man woman runs sits on the grass street red blue small big",
    "de": "ein hund katze mann frau läuft sitzt auf dem gras straße rot blau klein",
    "fr": "un chien chat homme femme court assis sur la herbe rue rouge bleu petit",
    "es": "un perro gato hombre mujer corre sentado en la hierba calle rojo azul",
    "ru": "собака кошка мужчина женщина бежит сидит на траве улице красный синий",
    "zh": "一只 狗 猫 男人 女人 在 草地 上 跑 坐 街道 红色 蓝色 小",
}
WORDS = {lang: text.split() for lang, text in _WORDS.items()}


def _text(rng: random.Random, lang: str) -> str:
    sep = "" if lang == "zh" else " "
    return sep.join(rng.choice(WORDS[lang]) for _ in range(rng.randint(3, 7)))


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path, format="JPEG")


def _gz(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(f"{x}\n" for x in lines))


def _txt(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


def write_multi30k(root: Path, n: int, rng: random.Random) -> None:
    base = root / "multi30k"
    dirs = {
        "test_2016_flickr": base / "flickr30k-images",
        "test_2017_flickr": base / "task1_test_2017",
        "test_2018_flickr": base / "task1_test_2018",
    }
    for split in MULTI30K_TASK1_SPLITS:
        names = []
        for i in range(n):
            if split == "test_2017_mscoco":
                name = f"COCO_val2014_{i:012d}.jpg"
                _image(root / "coco" / "val2014" / name, rng.randrange(1 << 30))
                names.append(f"{name}#{i % 5}")
            else:
                name = f"{split}_{i}.jpg"
                _image(dirs[split] / name, rng.randrange(1 << 30))
                names.append(name)
        _txt(base / "data/task1/image_splits" / f"{split}.txt", names)
        for lang in ("en", "de", "fr"):
            _gz(
                base / "data/task1/raw" / f"{split}.{lang}.gz", [_text(rng, lang) for _ in range(n)]
            )
    names = [f"t2_{i}.jpg" for i in range(n)]
    for name in names:
        _image(base / "flickr30k-images" / name, rng.randrange(1 << 30))
    _txt(base / "data/task2/image_splits/test_2016_images.txt", names)
    for k in range(1, 6):
        for lang in ("en", "de"):
            _gz(
                base / "data/task2/raw" / f"test_2016.{k}.{lang}.gz",
                [_text(rng, lang) for _ in range(n)],
            )


def write_xm3600(root: Path, n: int, rng: random.Random) -> None:
    base = root / "xm3600"
    lines = []
    for i in range(n):
        key = f"{i:016x}"
        _image(base / "images" / f"{key}.jpg", rng.randrange(1 << 30))
        rec = {"image/key": key}
        for lang in XM3600_LANGS:
            rec[lang] = {"caption": [_text(rng, lang) for _ in range(2)], "caption/tokenized": []}
        lines.append(json.dumps(rec, ensure_ascii=False))
    _txt(base / "captions.jsonl", lines)


def write_commute(root: Path, n: int, rng: random.Random) -> None:
    base = root / "CoMMuTE"
    names = [f"commute_{i}.jpg" for i in range(n)]
    for name in names:
        _image(base / "images" / name, rng.randrange(1 << 30))
    for lang in COMMUTE_LANGS:
        d = base / "CoMMuTE" / f"en-{lang}"
        _txt(d / "img.order", names)
        _txt(d / "src.en", [_text(rng, "en") for _ in range(n)])
        _txt(d / f"correct.{lang}", [_text(rng, lang) for _ in range(n)])
        _txt(d / f"incorrect.{lang}", [_text(rng, lang) for _ in range(n)])


def write_coco_karpathy(root: Path, n: int, rng: random.Random) -> None:
    base = root / "coco"
    images = []
    for i in range(n + 2):
        split = "test" if i < n else "train"
        name = f"COCO_val2014_{100 + i:012d}.jpg"
        if split == "test":
            _image(base / "val2014" / name, rng.randrange(1 << 30))
        sentences = [{"raw": _text(rng, "en")} for _ in range(5 + i % 2)]
        images.append({"split": split, "filename": name, "sentences": sentences})
    base.joinpath("annotations").mkdir(parents=True, exist_ok=True)
    (base / "annotations/coco_karpathy.json").write_text(json.dumps({"images": images}))


def write_downstream_datasets(root: str | Path, n: int = 3, seed: int = 0) -> Path:
    """All four datasets under ``root`` (``n`` samples per task); returns ``root``."""
    root, rng = Path(root), random.Random(seed)
    write_multi30k(root, n, rng)
    write_xm3600(root, n, rng)
    write_commute(root, n, rng)
    write_coco_karpathy(root, n, rng)
    return root
