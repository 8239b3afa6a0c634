"""Metrics of one downstream task from its predictions (metric names as the official eval).

- ``translation``: ``SacreBLEU`` (tokenizer ``zh`` for Chinese, ``13a`` else), ``COMET`` when
  ``unbabel-comet`` is importable and a local model path is given (official: wmt22-comet-da).
- ``coco_caption``: pycocoevalcap ``BLEU_1..4``, ``CIDEr``, ``cocoMETEOR`` (PTB tokenizer and
  METEOR need Java; without it they are skipped with a message).
- ``multi30k_caption``: the above plus ``SacreBLEU``: by default every image's five captions
  as references (transposed into sacrebleu's reference streams), with
  ``official_multi30k_bleu`` the official call ``corpus_bleu(hyps, per_image_lists)``: sacrebleu
  takes the N lists as N reference streams of 5, so only the first five hypotheses are scored,
  hypothesis j against caption j of every image (both are recorded: ``SacreBLEU_streams`` and
  ``SacreBLEU_official_first5``).
- ``xm3600``: ``XM3600_CIDEr``: pycocoevalcap CIDEr on normalised tokens (NFKC, lower case,
  the official punctuation set removed). The official eval segments words with stanza
  (model downloads); here words are split on white space and Chinese / Japanese / Thai text
  is split into characters, so zh (and slightly other) numbers differ from the paper's.
- ``ambiguity``: ``accuracy`` (%), correct translation with the lower mean token CE.
- ``METEOR`` (translation and Multi30K captioning, languages cz / de / en / es / fr): the
  official call of the METEOR 1.5 jar (``-l LANG``, ``-norm`` for en / de / fr / es, ``-r N``
  for N references per hypothesis) when ``meteor_jar`` is given: the full meteor-1.5
  distribution (its ``data/`` holds the paraphrase tables; pycocoevalcap's copy has English
  only).

Skipped metrics are listed under ``"skipped_metrics"`` with the reason.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import string
import subprocess
import tempfile
import unicodedata
from pathlib import Path

import torch

from mmcap.eval import downstream_metrics as dm

log = logging.getLogger(__name__)

PUNCTUATION = "".join(
    set(string.punctuation)
    | set(".·,。、:;?!'`\"-_/\\《》()[]{}><=+@#%&*")
    | set("，。！？；：“”‘’…„–—«»¿¡")
)
_STRIP = str.maketrans("", "", PUNCTUATION)


def _char_split(ch: str) -> bool:
    """Scripts written without spaces (CJK ideographs, kana, Thai): one token per character."""
    o = ord(ch)
    return (
        0x3040 <= o <= 0x30FF
        or 0x3400 <= o <= 0x9FFF
        or 0xF900 <= o <= 0xFAFF
        or 0x0E00 <= o <= 0x0E7F
        or 0x20000 <= o <= 0x2FA1F
    )


def xm3600_tokenize(text: str) -> str:
    """Normalised, space-joined tokens of a caption (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).translate(_STRIP).lower()
    out = []
    for word in text.split():
        piece = ""
        for ch in word:
            if _char_split(ch):
                if piece:
                    out.append(piece)
                    piece = ""
                out.append(ch)
            else:
                piece += ch
        if piece:
            out.append(piece)
    return " ".join(out)


def xm3600_cider(hypotheses: list[str], references: list[list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [xm3600_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [xm3600_tokenize(h)] for i, h in enumerate(hypotheses)}
    return Cider().compute_score(gts, res)[0] * 100


METEOR_LANGS = ("cz", "de", "en", "es", "fr")  # the official eval's METEOR languages


def meteor_jar_score(
    hypotheses: list[str], references: list[list[str]], lang: str, jar: str
) -> float:
    """METEOR 1.5 (x100) as the official ``meteor_eval``: every hypothesis's references on
    consecutive lines, ``-r N``, ``-l lang`` (+ ``-norm``); RuntimeError with the jar's
    output when it reports no score."""
    counts = {len(r) for r in references}
    if len(counts) != 1 or len(references) != len(hypotheses):
        raise ValueError(f"METEOR: {len(hypotheses)} hypotheses, reference counts {sorted(counts)}")
    hyp_lines = [h.replace("\n", " ") for h in hypotheses]
    ref_lines = [r.replace("\n", " ") for rs in references for r in rs]
    with tempfile.TemporaryDirectory() as d:
        hyp, ref = Path(d) / "hyp.txt", Path(d) / "ref.txt"
        hyp.write_text("".join(f"{x}\n" for x in hyp_lines), encoding="utf-8")
        ref.write_text("".join(f"{x}\n" for x in ref_lines), encoding="utf-8")
        cmd = ["java", "-Xmx2G", "-jar", str(jar), str(hyp), str(ref), "-l", lang]
        if lang in ("en", "de", "fr", "es"):
            cmd.append("-norm")
        if counts != {1}:
            cmd += ["-r", str(counts.pop())]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    m = re.search(r"Final score:\s+([\d.]+)", res.stdout)
    if m is None:
        raise RuntimeError(f"METEOR ({jar}, -l {lang}) gave no score: {res.stderr[-800:]}")
    return float(m.group(1)) * 100


def comet_available() -> bool:
    return importlib.util.find_spec("comet") is not None


def comet_score(sources, references, hypotheses, model_path: str) -> float:
    """COMET system score (x100) with the local checkpoint ``model_path``."""
    from comet import load_from_checkpoint

    model = load_from_checkpoint(model_path)
    data = [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references)]
    gpus = 1 if torch.cuda.is_available() else 0
    return model.predict(data, batch_size=8, gpus=gpus).system_score * 100


def score_task(
    metric: str,
    lang: str,
    predictions: list[str],
    references: list[list[str]],
    sources: list[str] | None = None,
    *,
    official_multi30k_bleu: bool = False,
    meteor: bool = True,
    comet_model: str | None = None,
    meteor_jar: str | None = None,
) -> dict:
    """The metrics of one task (see the module docstring); ``"skipped_metrics"`` says what was
    left out and why."""
    out: dict = {}
    skipped: dict[str, str] = {}
    if metric == "translation":
        refs = [r[0] for r in references]
        out["SacreBLEU"] = dm.translation_bleu(predictions, refs, lang)
        if comet_model is None:
            skipped["COMET"] = "no --comet-model given"
        elif not comet_available():
            skipped["COMET"] = "unbabel-comet is not installed"
        else:
            out["COMET"] = comet_score(sources, refs, predictions, comet_model)
    elif metric in ("coco_caption", "multi30k_caption"):
        if not dm.java_available():
            skipped["BLEU_4/CIDEr/cocoMETEOR"] = "no Java (pycocoevalcap's PTB tokenizer)"
        else:
            if not meteor:
                skipped["cocoMETEOR"] = "--no-meteor"
            out.update(dm.coco_caption_metrics(predictions, references, meteor=meteor))
        if metric == "multi30k_caption":
            streams = dm.caption_bleu_per_image(predictions, references, lang)
            first5 = dm.caption_bleu_official(predictions, references, lang)
            out["SacreBLEU_streams"] = streams
            out["SacreBLEU_official_first5"] = first5
            out["SacreBLEU"] = first5 if official_multi30k_bleu else streams
    elif metric == "xm3600":
        out["XM3600_CIDEr"] = xm3600_cider(predictions, references)
    else:
        raise ValueError(f"unknown metric family {metric!r}")
    if metric in ("translation", "multi30k_caption") and lang in METEOR_LANGS:
        if meteor_jar is None:
            skipped["METEOR"] = "no --meteor-jar (the official meteor-1.5.jar with its data/)"
        elif not dm.java_available():
            skipped["METEOR"] = "no Java"
        else:
            out["METEOR"] = meteor_jar_score(predictions, references, lang, meteor_jar)
    for name, why in skipped.items():
        log.warning("%s: %s skipped (%s)", lang, name, why)
    if skipped:
        out["skipped_metrics"] = skipped
    return out
