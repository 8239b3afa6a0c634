"""Captions and translations from a model directory: what ``tools/caption.py`` and
``tools/translate.py`` run.

:func:`load_pipeline` accepts an mmcap checkpoint (a fresh conversion or a training checkpoint:
``mmcap_checkpoint.json`` inside) or an exported Hugging Face directory (``config.json``). The
mmcap path runs :func:`mmcap.generate.generate` (KV cache, one process, TP=PP=1); the HF path
runs the exported model's ``generate()`` with the same :class:`GenerationConfig`. Output text
as the official eval: special tokens dropped, stripped, first character upper-cased.
Tokenizers: a converted checkpoint carries them (``tokenizer/`` BART, ``gemma/tokenizer.model``);
for a training checkpoint pass their paths.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from mmcap.data.prompts import build_prompt, task_string, zero_shot_prefix
from mmcap.generate.config import GenerationConfig
from mmcap.generate.generator import generate


def postprocess(text: str) -> str:
    """Official eval: strip, upper-case the first character."""
    text = text.strip()
    return text[:1].upper() + text[1:]


def read_images(paths: list[str | os.PathLike], size: int) -> torch.Tensor:
    """Normalised [n, 3, size, size] images; an unreadable file is an error naming it."""
    from mmcap.data.config import ImageConfig
    from mmcap.data.images import PILDecoder

    decoder = PILDecoder(ImageConfig(size=size))
    out = []
    for p in paths:
        try:
            out.append(decoder([Path(p).read_bytes()]))
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"image {p}: cannot be read or decoded ({e})") from e
    return torch.cat(out)


class MmcapPipeline:
    """An mmcap checkpoint in this process (world of one, TP=PP=1)."""

    def __init__(self, ckpt, image_size=None, bart_tokenizer=None, gemma_tokenizer=None):
        from mmcap.config import ParallelConfig
        from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer
        from mmcap.eval.runner import build_eval_model
        from mmcap.parallel import initialize_model_parallel

        ckpt = Path(ckpt)
        self.prompt_tok = PromptTokenizer(bart_tokenizer or ckpt / "tokenizer")
        self.target_tok = TargetTokenizer(gemma_tokenizer or ckpt / "gemma" / "tokenizer.model")
        initialize_model_parallel(ParallelConfig(), seed=1234)
        chunks, self.model_cfg = build_eval_model(ckpt, ParallelConfig(), image_size=image_size)
        self.model = chunks[0].eval()
        self.image_size = self.model_cfg.vision.image_size
        self.device = next(self.model.parameters()).device

    def run(self, tasks, images, prefixes, cfg: GenerationConfig) -> list[str]:
        ids = self.prompt_tok.encode([build_prompt(t) for t in tasks])
        prompt = torch.full((len(ids), max(len(x) for x in ids)), self.prompt_tok.pad_id)
        mask = torch.zeros_like(prompt, dtype=torch.bool)
        for i, x in enumerate(ids):
            prompt[i, : len(x)], mask[i, : len(x)] = torch.as_tensor(x), True
        pixels = read_images(images, self.image_size).to(self.device) if images else None
        prefix_ids = [self.target_tok.sp.encode(p) if p else None for p in prefixes]
        if cfg.vocab_limit == TOKENIZER_SIZE:
            cfg = dataclasses.replace(cfg, vocab_limit=self.target_tok.vocab_size)
        out = generate(
            self.model, prompt.to(self.device), mask.to(self.device), pixel_values=pixels,
            prefix_ids=prefix_ids, config=cfg,
        )
        # Rows past the tokenizer (the decoder table has 1,024 more) have no text.
        n = self.target_tok.vocab_size
        return [postprocess(self.target_tok.decode([i for i in t if i < n])) for t in out]


class HFPipeline:
    """An exported Hugging Face directory (``import mmcap.hf`` registers the classes)."""

    def __init__(self, directory, image_size=None):
        import mmcap.hf  # noqa: F401
        from transformers import AutoModelForImageTextToText

        from mmcap.hf.processing_mmcap import MmcapCaptionerProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(directory).eval()
        self.processor = MmcapCaptionerProcessor.from_pretrained(directory)
        if image_size is not None:
            raise ValueError("--image-size applies to mmcap checkpoints; re-export for HF")
        self.image_size = self.processor.image_processor.size["height"]

    def run(self, tasks, images, prefixes, cfg: GenerationConfig) -> list[str]:
        if not images:
            raise ValueError("the HF path generates from images; use an mmcap checkpoint for text")
        pixels = read_images(images, self.image_size)
        enc = self.processor(text=tasks, image_placeholders=True)  # pixels read above
        if cfg.vocab_limit == TOKENIZER_SIZE:
            cfg = dataclasses.replace(cfg, vocab_limit=len(self.processor.decoder_tokenizer))
        out = []
        for i, prefix in enumerate(prefixes):  # one sample at a time: prefixes may differ
            kwargs = {}
            start = 1
            if prefix:
                ids = self.processor.decoder_tokenizer(prefix, add_special_tokens=False)
                kwargs["decoder_input_ids"] = torch.tensor([[cfg.bos_token_id, *ids["input_ids"]]])
                start = 1 + kwargs["decoder_input_ids"].shape[1]
            with torch.no_grad():
                seq = self.model.generate(
                    input_ids=enc["input_ids"][i : i + 1],
                    attention_mask=enc["attention_mask"][i : i + 1],
                    pixel_values=pixels[i : i + 1],
                    **hf_generate_kwargs(cfg, self.model.config.decoder_vocab_size),
                    **kwargs,
                )[0, start:]
            out.append(postprocess(self.processor.decode(seq, skip_special_tokens=True)))
        return out


def hf_generate_kwargs(cfg: GenerationConfig, vocab_rows: int) -> dict:
    """transformers ``generate`` keyword arguments equal to ``cfg``."""
    banned = None if cfg.vocab_limit is None else list(range(cfg.vocab_limit, vocab_rows))
    return dict(
        suppress_tokens=banned,
        do_sample=False, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
        early_stopping=cfg.early_stopping, length_penalty=cfg.length_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        decoder_start_token_id=cfg.decoder_start_token_id,
        forced_bos_token_id=cfg.bos_token_id if cfg.forced_bos else None,
        forced_eos_token_id=cfg.forced_eos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, use_cache=cfg.use_cache,
    )


def load_pipeline(path, image_size=None, bart_tokenizer=None, gemma_tokenizer=None):
    """The pipeline of an mmcap checkpoint or an exported HF directory (clear error else)."""
    from mmcap.checkpoint.dist import CONFIG_FILE

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return MmcapPipeline(path, image_size, bart_tokenizer, gemma_tokenizer)
    if (path / "config.json").is_file():
        return HFPipeline(path, image_size)
    raise FileNotFoundError(
        f"{path}: neither an mmcap checkpoint ({CONFIG_FILE}) nor a Hugging Face directory "
        "(config.json)"
    )


def caption(pipe, images, lang: str, use_prefix: bool, cfg: GenerationConfig) -> list[str]:
    """One caption per image in ``lang`` (zero-shot decoder prefix with ``use_prefix``)."""
    prefix = zero_shot_prefix(lang) if use_prefix else None
    tasks = [task_string("caption", lang)] * len(images)
    return pipe.run(tasks, list(images), [prefix] * len(images), cfg)


def translate(pipe, texts, lang: str, cfg: GenerationConfig, images=None) -> list[str]:
    """``texts`` translated into ``lang`` (text only, or with one image per text)."""
    tasks = [task_string("translation", lang, t) for t in texts]
    return pipe.run(tasks, list(images or []), [None] * len(texts), cfg)


TOKENIZER_SIZE = -1  # vocab_limit placeholder: the pipeline's tokenizer size


def generation_config(beams: int, max_new_tokens: int, text_rows_only: bool = False):
    """The official settings with these beams / length; ``text_rows_only`` bans the decoder
    rows past the Gemma tokenizer (untrained, no text)."""
    return GenerationConfig(
        num_beams=beams,
        max_new_tokens=max_new_tokens,
        vocab_limit=TOKENIZER_SIZE if text_rows_only else None,
    )


def add_generation_args(ap) -> None:
    """The flags tools/caption.py and tools/translate.py share (an argparse parser)."""
    ap.add_argument("--ckpt", required=True, help="mmcap checkpoint or exported HF directory")
    ap.add_argument("--lang", required=True, choices=["en", "de", "fr", "es", "ru", "zh"])
    ap.add_argument("--beams", type=int, default=4, help="1 = greedy (default 4, official)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=None, help="e.g. 768 (fine-tuning)")
    ap.add_argument(
        "--text-rows-only",
        action="store_true",
        help="never generate decoder rows past the Gemma tokenizer (the 1,024 untrained rows; "
        "the official eval does not ban them)",
    )
    ap.add_argument("--bart-tokenizer", default=None, help="BART tokenizer dir (training ckpt)")
    ap.add_argument("--gemma-tokenizer", default=None, help="Gemma tokenizer.model (training ckpt)")
