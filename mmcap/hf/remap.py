"""Gemma-vocabulary decoder embeddings for the Florence sizes, from Florence-2's BART rows
(the job of the official ``prepare.py``, SYSTEM.md "Decoder side, Florence-2 sizes").

Rule: every row starts from N(0, 0.02) (padding row zeroed); the four specials map by hand to
their BART rows (<pad> -> <pad>, <eos> -> </s>, <bos> -> <s>, <unk> -> <unk>); every other Gemma
piece (leading U+2581 replaced by one space, other markers kept; byte-fallback and control
pieces as their literal text) is tokenised by the BART tokenizer without BOS/EOS and its row
becomes the MEAN of those BART rows. A piece that yields no BART token keeps its init and is
counted. Rows from the Gemma vocabulary size up to the table size (256,000 .. 257,024) keep
the init.

The piece -> BART ids map is built with ONE batched tokenizer call and cached as ``.npz`` with
the sha256 of both tokenizers, so a re-run (or another size) reuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SP_SPACE = "\u2581"
INIT_STD = 0.02  # official prepare.py


@dataclass
class TokenMap:
    """CSR map: Gemma id i -> BART ids ``ids[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray
    ids: np.ndarray
    key: str  # hash of both tokenizers

    def bart_ids(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i] : self.offsets[i + 1]]


def piece_text(piece: str) -> str:
    """The text a Gemma piece stands for: a leading U+2581 becomes one space."""
    return " " + piece[1:] if piece.startswith(SP_SPACE) else piece


def build_token_map(gemma, bart) -> TokenMap:
    """Tokenise every Gemma piece with the BART tokenizer in one batched call.

    Args:
        gemma: :class:`mmcap.data.tokenizers.TargetTokenizer`.
        bart: :class:`mmcap.data.tokenizers.PromptTokenizer`.
    """
    texts = [piece_text(gemma.sp.id_to_piece(i)) for i in range(gemma.vocab_size)]
    enc = bart.tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in enc), dtype=np.int64, count=len(enc))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.fromiter((t for x in enc for t in x), dtype=np.int64, count=int(offsets[-1]))
    return TokenMap(offsets, ids, token_map_key(gemma, bart))


def token_map_key(gemma, bart) -> str:
    return f"{gemma.content_hash[:16]}-{bart.content_hash[:16]}"


def load_or_build_token_map(gemma, bart, cache_dir: str | os.PathLike) -> tuple[TokenMap, bool]:
    """(map, was_cached): reuse ``cache_dir/.mmcap_token_map_<key>.npz`` when present."""
    key = token_map_key(gemma, bart)
    path = Path(cache_dir) / f".mmcap_token_map_{key}.npz"
    if path.is_file():
        data = np.load(path)
        if str(data["key"]) == key:
            return TokenMap(data["offsets"], data["ids"], key), True
    tm = build_token_map(gemma, bart)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, offsets=tm.offsets, ids=tm.ids, key=np.array(key))
    os.replace(tmp, path)
    return tm, False


@dataclass
class RemapReport:
    mean_rows: int
    special_rows: int
    zero_token_pieces: list[int]
    init_rows: int


def remap_decoder_embedding(
    bart_rows: torch.Tensor, tm: TokenMap, gemma, bart, table_rows: int, seed: int = 0
) -> tuple[torch.Tensor, RemapReport]:
    """The [table_rows, d] Gemma-vocabulary table from BART rows [V_bart, d] (float32 math)."""
    g = torch.Generator().manual_seed(seed)
    d = bart_rows.shape[1]
    out = torch.randn(table_rows, d, generator=g) * INIT_STD
    out[gemma.pad_id] = 0.0
    src = bart_rows.float()
    specials = {
        gemma.pad_id: bart.pad_id,
        gemma.eos_id: bart.eos_id,
        gemma.bos_id: bart.bos_id,
        gemma.sp.unk_id(): int(bart.tok.unk_token_id),
    }
    # Mean rule, vectorised: sum BART rows per Gemma id with index_add, divide by counts.
    n = gemma.vocab_size
    counts = torch.from_numpy(np.diff(tm.offsets)).to(torch.float32)
    owner = torch.repeat_interleave(torch.arange(n), torch.from_numpy(np.diff(tm.offsets)))
    sums = torch.zeros(n, d).index_add_(0, owner, src[torch.from_numpy(tm.ids)])
    has = counts > 0
    mean_ids = has.clone()
    mean_ids[list(specials)] = False
    out[:n][mean_ids] = sums[mean_ids] / counts[mean_ids, None]
    for gi, bi in specials.items():
        out[gi] = src[bi]
    zero = [i for i in torch.nonzero(~has).flatten().tolist() if i not in specials]
    report = RemapReport(int(mean_ids.sum()), len(specials), zero, table_rows - n + len(zero))
    return out.to(bart_rows.dtype), report
