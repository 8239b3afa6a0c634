"""Downstream metrics of the paper's evaluation, from the established packages.

- :func:`translation_bleu`: sacrebleu corpus BLEU, tokenizer ``zh`` for Chinese, ``13a`` else.
- :func:`caption_bleu_per_image`: sacrebleu BLEU of captions with several references per image,
  correctly (references transposed into reference *streams*), and
  :func:`caption_bleu_official`, which reproduces the official Multi30K captioning BLEU: it
  passes the per-image reference lists as if they were streams, so sacrebleu zips N
  "streams" of 5 references with the hypotheses and scores only the first 5 hypotheses.
- :func:`coco_caption_metrics`: pycocoevalcap BLEU-1..4 and CIDEr on PTB-tokenized text (as
  the official eval), METEOR when Java is found (skipped with a message otherwise; the PTB
  tokenizer needs Java too).
- :func:`sentence_ce` / :func:`ambiguity_accuracy`: CoMMuTE lexical ambiguity: a sample is
  right when the correct translation has the lower mean token CE.
Scores are on a 0-100 scale, as the paper reports them.
"""

from __future__ import annotations

import logging
import shutil

import torch

from mmcap.config import IGNORE_INDEX

log = logging.getLogger(__name__)


def _check(hypotheses: list[str], n_refs: int, what: str) -> None:
    if len(hypotheses) != n_refs:
        raise ValueError(f"{what}: {len(hypotheses)} hypotheses for {n_refs} references")
    empty = [i for i, h in enumerate(hypotheses) if not h.strip()]
    if empty:
        log.warning("%s: %d empty hypotheses (first: #%d) scored as empty", what, len(empty), empty[0])


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu tokenizer of a target language (official: ``zh`` for Chinese, else 13a)."""
    return "zh" if lang == "zh" else "13a"


def translation_bleu(hypotheses: list[str], references: list[str], lang: str) -> float:
    """Corpus BLEU of one reference per hypothesis."""
    import sacrebleu

    _check(hypotheses, len(references), "translation BLEU")
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize=bleu_tokenizer(lang)).score


def caption_bleu_per_image(hypotheses: list[str], references: list[list[str]], lang: str) -> float:
    """Corpus BLEU with every image's reference list (equal lengths) as its references."""
    import sacrebleu

    _check(hypotheses, len(references), "caption BLEU")
    n = {len(r) for r in references}
    if len(n) != 1:
        raise ValueError(f"caption BLEU: images have different reference counts {sorted(n)}")
    streams = [list(s) for s in zip(*references, strict=True)]  # [n_refs][n_images]
    return sacrebleu.corpus_bleu(hypotheses, streams, tokenize=bleu_tokenizer(lang)).score


def caption_bleu_official(hypotheses: list[str], references: list[list[str]], lang: str) -> float:
    """The official Multi30K captioning BLEU (``sacrebleu.corpus_bleu(hyps, refs)`` with
    per-image reference lists): only the first ``len(references[0])`` hypotheses are scored."""
    import sacrebleu

    return sacrebleu.corpus_bleu(hypotheses, references, tokenize=bleu_tokenizer(lang)).score


def java_available() -> bool:
    return shutil.which("java") is not None


def coco_caption_metrics(
    hypotheses: list[str], references: list[list[str]], meteor: bool = True
) -> dict[str, float]:
    """BLEU_1..4, CIDEr (and cocoMETEOR) as the official ``pycocoevalcap_eval``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check(hypotheses, len(references), "COCO metrics")
    if not java_available():
        raise RuntimeError("COCO caption metrics need Java (the PTB tokenizer); none found")
    gts = {i: [{"caption": r.strip()} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": h.strip()}] for i, h in enumerate(hypotheses)}
    tok = PTBTokenizer()
    gts, res = tok.tokenize(gts), tok.tokenize(res)
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    for i, s in enumerate(bleu):
        out[f"BLEU_{i + 1}"] = s * 100
    out["CIDEr"] = Cider().compute_score(gts, res)[0] * 100
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["cocoMETEOR"] = Meteor().compute_score(gts, res)[0] * 100
    return out


@torch.no_grad()
def sentence_ce(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_ids: list[list[int]],
    pixel_values: torch.Tensor | None = None,
    start_token_id: int = 1,
) -> torch.Tensor:
    """Mean token CE [b] of each Gemma target (``<bos> ... <eos>``, the official
    ``tokenizer(text)`` ids) given its prompt, teacher forced with decoder input
    ``[start] + target[:-1]`` (as training)."""
    b, longest = len(target_ids), max(len(t) for t in target_ids)
    dev = prompt_ids.device
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long, device=dev)
    dec = torch.zeros((b, longest), dtype=torch.long, device=dev)
    for i, t in enumerate(target_ids):
        labels[i, : len(t)] = torch.as_tensor(t)
        dec[i, 0] = start_token_id
        dec[i, 1 : len(t)] = torch.as_tensor(t[:-1])
    loss = model(prompt_ids, dec, prompt_mask, pixel_values=pixel_values, labels=labels)
    return loss.sum(1) / (labels != IGNORE_INDEX).sum(1)


def ambiguity_accuracy(ce_correct: torch.Tensor, ce_incorrect: torch.Tensor) -> float:
    """Share of samples (in %) whose correct translation has the lower mean CE."""
    if ce_correct.shape != ce_incorrect.shape or ce_correct.numel() == 0:
        raise ValueError("ambiguity accuracy needs equal, non-empty lists of scores")
    return (ce_correct < ce_incorrect).float().mean().item() * 100
