"""The two tokenizers of the data pipeline, each with a content hash recorded in manifests.

- :class:`TargetTokenizer`: the Gemma-2 SentencePiece model for decoder targets,
  ``[<bos>=2] + pieces + [<eos>=1]``, pad 0 (SYSTEM.md "Tasks and prompts"). Text is encoded
  with SentencePiece directly: control strings in the text ("<eos>") stay text.
- :class:`PromptTokenizer`: the Florence-2 (BART byte-level BPE) tokenizer for encoder
  prompts, ``<s> ... </s>``, loaded with transformers from a local directory.

The hash is the sha256 over the tokenizer's model files (names and bytes), so two datasets
tokenized with the same files carry the same hash whatever the paths were.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

# Files that define a Hugging Face tokenizer directory (those present are hashed).
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def hf_tokenizer_files(directory: str | os.PathLike) -> list[Path]:
    """The Hugging Face tokenizer files present in ``directory`` (those that are hashed)."""
    return [Path(directory) / f for f in _HF_TOKENIZER_FILES if (Path(directory) / f).is_file()]


def hash_files(paths: list[Path], names: list[str] | None = None) -> str:
    """sha256 over (file name, size, bytes) of each path, in the order given; ``names``
    replaces the file names (a copy stored under another name hashes as its original)."""
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        data = Path(p).read_bytes()
        name = names[i] if names is not None else Path(p).name
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


class TargetTokenizer:
    """Gemma-2 SentencePiece model for decoder targets.

    Args:
        model_file: path of the SentencePiece ``tokenizer.model``.
    """

    pad_id = 0
    eos_id = 1
    bos_id = 2
    decoder_start_id = 1  # official decoder_start_token_id (= eos)

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = str(model_file)
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"Gemma tokenizer model {self.model_file} does not exist")
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        self.vocab_size = self.sp.get_piece_size()
        got = (self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id())
        if got != (self.pad_id, self.eos_id, self.bos_id):
            raise ValueError(
                f"{self.model_file}: special ids (pad, eos, bos) = {got}, expected (0, 1, 2) "
                "as in Gemma-2's tokenizer.model"
            )
        self.content_hash = hash_files([Path(self.model_file)])

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (int32) of each text with BOS and EOS."""
        out = self.sp.encode(list(texts), out_type=int)
        return [np.array([self.bos_id, *ids, self.eos_id], dtype=np.int32) for ids in out]

    def decode(self, ids) -> str:
        """Text of ids, special tokens dropped."""
        keep = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id, self.bos_id)]
        return self.sp.decode(keep)

    def describe(self) -> dict:
        return {
            "kind": "sentencepiece",
            "file": Path(self.model_file).name,
            "sha256": self.content_hash,
            "vocab_size": self.vocab_size,
        }


class PromptTokenizer:
    """Florence-2 BART tokenizer for encoder prompts, from a local directory.

    Args:
        directory: folder with the Hugging Face tokenizer files (Florence-2's ``vocab.json``,
            ``merges.txt``, ``tokenizer.json``, ``tokenizer_config.json``, ...).
    """

    def __init__(self, directory: str | os.PathLike):
        from transformers import AutoTokenizer

        self.directory = str(directory)
        files = hf_tokenizer_files(self.directory)
        if not files:
            raise FileNotFoundError(
                f"encoder tokenizer directory {self.directory} holds none of {_HF_TOKENIZER_FILES}"
            )
        self.tok = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
        self.pad_id = int(self.tok.pad_token_id)
        self.bos_id = int(self.tok.bos_token_id)
        self.eos_id = int(self.tok.eos_token_id)
        self.vocab_size = len(self.tok)
        self.content_hash = hash_files(files)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids (int32) of each prompt text, ``<s> ... </s>``."""
        if not texts:
            return []
        ids = self.tok(list(texts), add_special_tokens=True, return_attention_mask=False)
        return [np.asarray(x, dtype=np.int32) for x in ids["input_ids"]]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def describe(self) -> dict:
        return {
            "kind": type(self.tok).__name__,
            "directory": Path(self.directory).name,
            "sha256": self.content_hash,
            "vocab_size": self.vocab_size,
        }
