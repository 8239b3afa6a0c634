"""Tiny, locally built stand-ins for the real data inputs (no hub, no downloads).

- :func:`build_tiny_gemma_tokenizer`: a SentencePiece BPE model trained in-process on generated
  multilingual text, with Gemma-2's special ids (pad 0, eos 1, bos 2, unk 3) and byte fallback.
- :func:`build_tiny_bart_tokenizer`: a byte-level BPE in the Florence-2/BART layout
  (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>``) loadable by ``AutoTokenizer``.
- :func:`make_jpeg`, :func:`write_official_tar`, :func:`write_jsonl`, :func:`synthetic_entries`:
  real JPEG bytes and the official webdataset / JSONL input layouts;
  :func:`finetuning_entries` and :func:`write_finetuning_tars`: the official fine-tuning tars.
- :func:`write_synthetic_dataset`: a complete indexed dataset of random ids (benchmarks, demos).

Everything is deterministic from its seed.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np

from mmcap.data.prompts import CAPTION_TOKENS, LANG_MODIFIERS, LANGS, TRANSLATE_TEMPLATE

_WORDS = {  # space-separated words; Chinese: one word per character
    "en": "the image shows a dog cat on grass with red car house tree people walking street",
    "de": "das bild zeigt einen hund katze auf gras mit rotem auto haus baum menschen straße",
    "fr": "la photo montre un chien chat sur herbe avec voiture rouge maison arbre gens rue",
    "es": "la imagen muestra un perro gato sobre hierba con coche rojo casa árbol gente",
    "ru": "на картинке изображен собака кошка трава с красной машиной дом дерево люди",
    "zh": "图为一只狗猫在草地上有红色的汽车房子树人们走街",
}


def sentence(rng: random.Random, lang: str, n_words: tuple[int, int] = (3, 12)) -> str:
    """A random sentence in ``lang`` from a small word list."""
    vocab = list(_WORDS[lang]) if lang == "zh" else _WORDS[lang].split()
    words = [rng.choice(vocab) for _ in range(rng.randint(*n_words))]
    text = ("" if lang == "zh" else " ").join(words)
    return text[:1].upper() + text[1:] + ("。" if lang == "zh" else ".")


def _corpus(seed: int, n: int = 2000) -> list[str]:
    rng = random.Random(seed)
    lines = [sentence(rng, rng.choice(LANGS)) for _ in range(n)]
    lines += [f"{m} {t}" for m in LANG_MODIFIERS.values() for t in CAPTION_TOKENS.values()]
    lines += [TRANSLATE_TEMPLATE.format(src=sentence(rng, "en")) for _ in range(200)]
    lines += [" ".join(str(rng.randint(0, 10**6)) for _ in range(5)) for _ in range(50)]
    return lines


def build_tiny_gemma_tokenizer(
    out_dir: str | Path, vocab_size: int = 600, seed: int = 0, corpus: list[str] | None = None
) -> Path:
    """Train a tiny Gemma-like SentencePiece model (Gemma-2's special ids, byte fallback) on
    ``corpus`` (default: random sentences from ``seed``); returns the ``tokenizer.model`` path."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(seed) if corpus is None else corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=True,
        # Gemma-2's normalizer: identity, no dummy prefix, whitespace kept, digits split.
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def build_tiny_bart_tokenizer(
    out_dir: str | Path, vocab_size: int = 500, seed: int = 0, corpus: list[str] | None = None
) -> Path:
    """Train a tiny byte-level BPE in the BART layout on ``corpus`` (default: random sentences
    from ``seed``); returns the directory."""
    from tokenizers import ByteLevelBPETokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus(seed) if corpus is None else corpus,
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(out))  # vocab.json + merges.txt
    config = {"tokenizer_class": "BartTokenizer", "model_max_length": 1024}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def make_jpeg(
    seed: int, size: tuple[int, int] = (64, 48), quality: int = 90, mode: str = "RGB"
) -> bytes:
    """JPEG bytes of a smooth random image (gradients + blobs + mild noise), (width, height)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * xx / 7 + b * yy / 5 + 6 * p)
    img += rng.normal(0, 8, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        pil = pil.convert(mode)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_png(seed: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """PNG bytes (a valid image that is not a JPEG)."""
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def synthetic_entries(rng: random.Random, keys: list[str] | None = None) -> list[dict]:
    """Official .data entries of one image: a caption or translation for each key given."""
    keys = keys or ["caption-en", "caption-de", "translation-de", "translation-fr"]
    entries = []
    for key in keys:
        task, lang = key.split("-")
        mod = f"<LANG_{lang.upper()}>"
        if task == "caption":
            token = rng.choice(list(CAPTION_TOKENS))
            entries.append(
                {
                    "type": "caption",
                    "lang": lang,
                    "prompt": f"{mod}{token}",
                    "output": sentence(rng, lang),
                }
            )
        else:
            entries.append(
                {
                    "type": "translation",
                    "lang": lang,
                    "prompt": f"{mod}<TRANSLATE>{sentence(rng, 'en')}",
                    "output": sentence(rng, lang),
                }
            )
    return entries


def write_official_tar(
    path: str | Path, samples: list[tuple[str, bytes | None, bytes | None]]
) -> Path:
    """Write a webdataset tar: per sample ``{key}.jpg`` and ``{key}.data`` (raw bytes; None
    leaves the member out). ``.data`` is usually ``json.dumps(entries).encode()``."""
    return _write_tar(path, samples, order=("jpg", "data"))


def _write_tar(path, samples, order: tuple[str, str]) -> Path:
    path = Path(path)
    with tarfile.open(path, "w") as tar:
        for key, jpg, data in samples:
            payloads = {"jpg": jpg, "data": data}
            for ext, payload in ((e, payloads[e]) for e in order):
                if payload is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


FINETUNING_PER_TAR = 5_000  # official finetuning_dataset/bake.py COUNT_PER_TAR


def finetuning_entries(
    rng: random.Random, keys: list[str], img_path: str, prompt_tokenizer=None, target_tokenizer=None
) -> list[dict]:
    """Official fine-tuning .data entries of one image (``finetuning_dataset/bake.py``): the
    EXPANDED prompt, ``img_path``, and ``prompt_ids`` / ``output_ids`` from the given
    :class:`~mmcap.data.tokenizers.PromptTokenizer` / ``TargetTokenizer`` (empty lists
    without), in the official field order."""
    from mmcap.data.prompts import build_prompt

    out = []
    for key in keys:
        task, lang = key.split("-")
        mod = f"<LANG_{lang.upper()}>"
        if task == "caption":
            task_string = mod + rng.choice(list(CAPTION_TOKENS))
        else:
            task_string = f"{mod}<TRANSLATE>{sentence(rng, 'en')}"
        prompt, output = build_prompt(task_string), sentence(rng, lang)
        enc = prompt_tokenizer.encode([prompt])[0].tolist() if prompt_tokenizer else []
        dec = target_tokenizer.encode([output])[0].tolist() if target_tokenizer else []
        out.append(
            {
                "img_path": img_path,
                "prompt": prompt,
                "prompt_ids": enc,
                "output": output,
                "output_ids": dec,
                "type": task,
                "lang": lang,
            }
        )
    return out


def write_finetuning_tars(
    out_dir: str | Path, records: list[tuple[bytes, list[dict]]], per_tar: int = FINETUNING_PER_TAR
) -> list[Path]:
    """Write (jpg, entries) records as the official fine-tuning tars: webdataset's ShardWriter
    layout, ``%06d.tar`` with ``per_tar`` records each, keys ``%06d`` counting across tars,
    members in sorted extension order (``.data`` then ``.jpg``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, start in enumerate(range(0, len(records), per_tar)):
        chunk = records[start : start + per_tar]
        samples = [
            (f"{start + i:06d}", jpg, json.dumps(entries).encode("utf-8"))
            for i, (jpg, entries) in enumerate(chunk)
        ]
        paths.append(_write_tar(out / f"{t:06d}.tar", samples, order=("data", "jpg")))
    return paths


def write_jsonl(path: str | Path, lines: list[dict | bytes]) -> Path:
    """Write JSONL: dicts are dumped, bytes are written as they are (for broken lines)."""
    path = Path(path)
    with open(path, "wb") as f:
        for line in lines:
            f.write(
                line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()
            )
            f.write(b"\n")
    return path


def write_synthetic_dataset(
    out_dir: str | Path,
    n_groups: int,
    seed: int = 0,
    jpeg: bytes | None = None,
    prompt_vocab: int = 51289,
    target_vocab: int = 256000,
) -> Path:
    """A complete dataset of random token ids (no tokenizers), for benchmarks and demos.

    Each group has 1-7 pretraining-key entries (prompt 15-60 ids, target 8-120 ids) and one
    image (``jpeg``, default a 64x48 test JPEG, shared by all groups to keep it small).
    """
    from mmcap.data.indexed import FORMAT, MANIFEST, TASK_TOKENS, ShardWriter, merge_shards
    from mmcap.data.manifest import DatasetStats, build_manifest, write_json_durable
    from mmcap.data.prompts import KEY_IDS, PRETRAINING_KEYS

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    jpeg = jpeg or make_jpeg(seed)
    shard = out.with_name(out.name + ".shard")
    w = ShardWriter(shard, prompt_vocab)
    stats = DatasetStats()
    for g in range(n_groups):
        group, image = w.new_group(), w.add_image(jpeg)
        keys = rng.choice(len(PRETRAINING_KEYS), size=rng.integers(1, 8), replace=False)
        for j, k in enumerate(keys.tolist()):
            key = PRETRAINING_KEYS[k]
            p = rng.integers(3, prompt_vocab, rng.integers(15, 61)).astype(np.int32)
            t = rng.integers(3, target_vocab, rng.integers(8, 121)).astype(np.int32)
            task = TASK_TOKENS.index(
                "<TRANSLATE>" if key.startswith("translation") else "<CAPTION>"
            )
            w.add_entry(
                p,
                t,
                f"syn{g}",
                key=KEY_IDS[key],
                task=task,
                group=group,
                image=image,
                record=g,
                entry=j,
            )
            stats.add_entry(key, len(p), len(t))
    w.finalize()
    stats.records_seen = stats.records_kept = n_groups
    stats.entries_seen = stats.entries_kept
    counts = merge_shards([shard], out)
    (out / "rejects.jsonl").write_text("")
    manifest = build_manifest(
        fmt=FORMAT,
        sources=[{"path": "synthetic", "size": 0}],
        tokenizers={},
        config={"seed": seed},
        counts=counts,
        stats=stats,
        files_dir=out,
    )
    write_json_durable(out / MANIFEST, manifest)
    shutil.rmtree(shard)
    return out
