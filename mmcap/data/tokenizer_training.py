"""Train the two tokenizers on your own texts (``tools/train_tokenizers.py``), for models
trained from scratch on data the Florence-2 / Gemma-2 tokenizers do not suit.

Reads the same inputs as ``tools/preprocess_data.py`` (official webdataset tars, JSONL) and
plain ``.txt`` files (one text per line, used for both sides), and writes a *tokenizer set*
(:mod:`mmcap.checkpoint.inference_assets`):

- ``OUT/encoder/``: a byte-level BPE in the Florence-2 / BART layout (``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2, ``<unk>`` 3, ``<mask>``; ``vocab.json``, ``merges.txt``,
  ``tokenizer_config.json``), trained on the expanded encoder prompts (every caption prompt in
  the six languages, and the translation prompts with their sources);
- ``OUT/decoder/tokenizer.model``: a SentencePiece BPE with Gemma-2's special ids (pad 0,
  eos 1, bos 2, unk 3), byte fallback and Gemma-2's normaliser, trained on the target texts.

Invalid records are skipped here (preprocessing reports them). ``OUT`` appears only when both
tokenizers are written and load (atomic rename).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mmcap.data.prompts import CAPTION_TOKENS, LANG_MODIFIERS, build_prompt


def _entries(path: Path) -> Iterator[dict]:
    """Raw {type, lang, prompt, output} dicts of a tar / JSONL file (invalid ones skipped)."""
    from mmcap.data.records import EntryError, iter_jsonl, iter_tar, parse_data_member

    if path.name.endswith(".jsonl"):
        for _, raw, _ in iter_jsonl(str(path)):
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj
        return
    for sample in iter_tar(str(path)):
        members = getattr(sample, "members", None)
        if members is None:  # a bad_archive reject ends the file
            return
        try:
            yield from parse_data_member(members.get("data"), max_chars=1 << 20)
        except EntryError:
            continue


def collect_texts(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(encoder prompt texts, decoder target texts) of the input files."""
    from mmcap.data.inputs import expand_inputs

    prompts = [f"{m} {t}" for m in LANG_MODIFIERS.values() for t in CAPTION_TOKENS.values()]
    targets: list[str] = []
    txt = [p for p in inputs if p.endswith(".txt")]
    for path in txt:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--input {path}: no such file")
        lines = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines()]
        prompts += [x for x in lines if x]
        targets += [x for x in lines if x]
    records = [p for p in inputs if not p.endswith(".txt")]
    for path in expand_inputs(records) if records else []:
        for e in _entries(path):
            prompt, output = e.get("prompt"), e.get("output")
            if isinstance(prompt, str) and prompt.strip():
                try:
                    prompts.append(build_prompt(prompt) if prompt.startswith("<") else prompt)
                except ValueError:  # not a task string (preprocessing rejects it): raw text
                    prompts.append(prompt)
            if isinstance(output, str) and output.strip():
                targets.append(output)
    if not targets:
        raise ValueError(f"no target texts found in {inputs}; expected tars, JSONL or .txt files")
    return prompts, targets


def train_tokenizers(
    inputs: list[str],
    out: str | os.PathLike,
    encoder_vocab_size: int,
    decoder_vocab_size: int,
    overwrite: bool = False,
) -> dict:
    """Train both tokenizers on ``inputs`` into ``out`` (a tokenizer set); returns a summary."""
    from mmcap.checkpoint.inference_assets import DECODER_FILE, ENCODER_DIR
    from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer

    final = Path(out)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists; choose another --out or pass --overwrite")
    for name, n in (("encoder", encoder_vocab_size), ("decoder", decoder_vocab_size)):
        if n < 300:  # 256 byte pieces / byte-level alphabet + the specials
            raise ValueError(f"--{name}-vocab-size must be >= 300 (byte fallback), got {n}")
    prompts, targets = collect_texts(inputs)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tiny_bart_tokenizer(tmp / ENCODER_DIR, encoder_vocab_size, corpus=prompts)
        try:
            build_tiny_gemma_tokenizer(
                (tmp / DECODER_FILE).parent, decoder_vocab_size, corpus=targets
            )
        except RuntimeError as e:  # SentencePiece: "Vocabulary size too high (N). Please set..."
            raise ValueError(
                f"the decoder tokenizer cannot have {decoder_vocab_size} pieces with "
                f"{len(targets)} target texts ({e}); lower --decoder-vocab-size or add text"
            ) from None
        enc, dec = PromptTokenizer(tmp / ENCODER_DIR), TargetTokenizer(tmp / DECODER_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {
        "out": str(final),
        "encoder_tokenizer": str(final / ENCODER_DIR),
        "gemma_tokenizer": str(final / DECODER_FILE),
        "encoder_vocab_size": enc.vocab_size,
        "decoder_vocab_size": dec.vocab_size,
        "prompt_texts": len(prompts),
        "target_texts": len(targets),
    }
