"""What inference needs besides the weights: the two tokenizers, the image size and the prompts.

A *tokenizer set* is a folder with ``encoder/`` (the Florence-2 / BART prompt tokenizer's Hugging
Face files) and ``decoder/tokenizer.model`` (the Gemma-2 SentencePiece model). It is stored

- in every dataset made by ``tools/preprocess_data.py``: ``<dataset>/tokenizers/``;
- in every training checkpoint: ``<step>/inference/`` (with ``inference.json``: image size,
  crop lengths, task strings and prompt texts, tokenizer hashes and where they came from),
  written by rank 0 inside the ``step_N.partial`` directory, so it appears with the step;
- by ``tools/convert_from_hf.py`` in its own layout: ``tokenizer/`` + ``gemma/tokenizer.model``.

:func:`tokenizers_in` finds a set in any of these; :func:`find_run_tokenizers` picks the one a
training run stores (checked against the hashes its datasets' manifests record), and
``tools/convert_to_hf.py`` reads it back to write the processor.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INFERENCE_DIR = "inference"
INFO_FILE = "inference.json"
ENCODER_DIR = "encoder"
DECODER_FILE = "decoder/tokenizer.model"
DATASET_TOKENIZERS = "tokenizers"  # <dataset>/tokenizers/ (a tokenizer set)


@dataclass(frozen=True)
class TokenizerFiles:
    """Where a pair of tokenizers lies.

    Args:
        encoder_dir: the BART prompt tokenizer's directory.
        decoder_model: the Gemma SentencePiece ``tokenizer.model``.
        origin: where they were found (for messages and ``inference.json``).
    """

    encoder_dir: Path
    decoder_model: Path
    origin: str

    def hashes(self, decoder_name: str | None = None) -> dict[str, str]:
        """{"prompt": sha256, "target": sha256} as dataset manifests record them
        (:mod:`mmcap.data.tokenizers`); ``decoder_name``: the Gemma file's original name."""
        from mmcap.data.tokenizers import hash_files, hf_tokenizer_files

        name = decoder_name or self.decoder_model.name
        return {
            "prompt": hash_files(hf_tokenizer_files(self.encoder_dir)),
            "target": hash_files([self.decoder_model], names=[name]),
        }

    def files(self, prefix: str = "") -> dict[str, Path]:
        """{relative destination: source} of a tokenizer set under ``prefix``."""
        from mmcap.data.tokenizers import hf_tokenizer_files

        out = {f"{prefix}{ENCODER_DIR}/{p.name}": p for p in hf_tokenizer_files(self.encoder_dir)}
        out[f"{prefix}{DECODER_FILE}"] = self.decoder_model
        return out


def _complete(encoder_dir: Path, decoder_model: Path, origin: str) -> TokenizerFiles | None:
    from mmcap.data.tokenizers import hf_tokenizer_files

    if encoder_dir.is_dir() and hf_tokenizer_files(encoder_dir) and decoder_model.is_file():
        return TokenizerFiles(encoder_dir, decoder_model, origin)
    return None


def tokenizers_in(path: str | os.PathLike) -> TokenizerFiles | None:
    """The tokenizer set stored in ``path``: a tokenizer set itself, a training checkpoint
    (``inference/``), a dataset (``tokenizers/``) or a ``convert_from_hf.py`` checkpoint
    (``tokenizer/`` + ``gemma/tokenizer.model``); None when it holds none."""
    p = Path(path)
    layouts = (
        (p, ""),
        (p / INFERENCE_DIR, f"{INFERENCE_DIR}/"),
        (p / DATASET_TOKENIZERS, f"{DATASET_TOKENIZERS}/"),
    )
    for root, label in layouts:
        found = _complete(root / ENCODER_DIR, root / DECODER_FILE, f"{p} ({label or 'set'})")
        if found:
            return found
    return _complete(
        p / "tokenizer", p / "gemma" / "tokenizer.model", f"{p} (tokenizer/ + gemma/tokenizer.model)"
    )


def _manifest_tokenizers(dataset: str) -> dict:
    try:
        return json.loads((Path(dataset) / "manifest.json").read_text()).get("tokenizers") or {}
    except (OSError, ValueError):
        return {}  # a missing / unreadable dataset is reported by the data loader


def find_run_tokenizers(
    datasets: list[str], load: Path | None = None, resume: Path | None = None
) -> TokenizerFiles | None:
    """The tokenizers a run's checkpoints carry: the resumed checkpoint's, else the first train
    dataset's copy, else those of ``checkpoint.load``, each used only when it matches the
    hashes the datasets' manifests record. None (with a warning) when there are none."""
    recorded = _manifest_tokenizers(datasets[0]) if datasets else {}
    want = {side: info.get("sha256") for side, info in recorded.items() if info.get("sha256")}
    decoder_name = (recorded.get("target") or {}).get("file")
    candidates = [resume, *[Path(d) for d in datasets[:1]], load]
    for c in candidates:
        found = tokenizers_in(c) if c is not None else None
        if found is None:
            continue
        got = found.hashes(decoder_name)
        differ = [s for s, h in want.items() if got.get(s) != h]
        if differ:
            log.warning(
                "not storing the tokenizers of %s in checkpoints: its %s tokenizer differs from "
                "the one %s was tokenized with (sha256)",
                found.origin,
                " and ".join(differ),
                datasets[0],
            )
            continue
        return found
    # Synthetic data (tests, benchmarks) records no tokenizers: nothing to warn about.
    (log.warning if recorded else log.info)(
        "checkpoints of this run will not carry tokenizers (none in the datasets, which predate "
        "tools/preprocess_data.py storing them, nor in checkpoint.load): "
        "tools/convert_to_hf.py will then need --tokenizers DIR or --encoder-tokenizer / "
        "--gemma-tokenizer to write the processor"
    )
    return None


def inference_info(model_cfg, batch_cfg, tokenizers: TokenizerFiles) -> dict:
    """``inference.json``: what the processor needs and what the model was trained with."""
    from mmcap.data.prompts import (
        CAPTION_TOKENS,
        LANG_MODIFIERS,
        LANGS,
        TRANSLATE_TEMPLATE,
        TRANSLATE_TOKEN,
        ZERO_SHOT_PREFIXES,
    )

    return {
        "image_size": model_cfg.vision.image_size,
        "num_image_tokens": model_cfg.vision.num_image_tokens,
        "max_prompt_tokens": batch_cfg.max_prompt_tokens,
        "max_target_tokens": batch_cfg.max_target_tokens,
        "languages": list(LANGS),
        "task_strings": {
            "caption": "<LANG_XX><CAPTION>",
            "translation": f"<LANG_XX>{TRANSLATE_TOKEN}source text",
        },
        "prompts": {
            "language_modifiers": LANG_MODIFIERS,
            "caption_tokens": CAPTION_TOKENS,
            "translate": TRANSLATE_TEMPLATE,
            "zero_shot_prefixes": ZERO_SHOT_PREFIXES,
        },
        "tokenizers": {"origin": tokenizers.origin, "sha256": tokenizers.hashes()},
    }


def inference_files(model_cfg, batch_cfg, tokenizers: TokenizerFiles | None) -> dict:
    """{path under a checkpoint: source file or bytes} of the ``inference/`` folder (empty
    without tokenizers)."""
    if tokenizers is None:
        return {}
    info = inference_info(model_cfg, batch_cfg, tokenizers)
    files: dict = tokenizers.files(prefix=f"{INFERENCE_DIR}/")
    files[f"{INFERENCE_DIR}/{INFO_FILE}"] = json.dumps(info, indent=1, ensure_ascii=False).encode()
    return files


def write_files(root: Path, files: dict) -> None:
    """Copy / write ``files`` ({relative path: source Path or bytes}) under ``root``."""
    import shutil

    for rel, src in files.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dst.write_bytes(src)
        else:
            shutil.copyfile(src, dst)
