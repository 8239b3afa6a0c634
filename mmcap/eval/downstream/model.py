"""The model side of the downstream evaluation: captions, translations and CoMMuTE sentence
scores from an mmcap checkpoint or an exported HF directory (:mod:`mmcap.generate.pipeline`).

As the official eval: every task is image-conditioned (translation prompts carry the image);
the zero-shot prefix (``use_prefix``) applies to captioning only (the official translation
path has no prefix); a sentence's score is its mean token CE over the Gemma ids
``<bos> text <eos>`` with decoder input ``[<eos>, <bos>, text]`` (official ``get_perplexity``
compares exp of that mean: the same order).
"""

from __future__ import annotations

import os

import torch

from mmcap.data.prompts import build_prompt, task_string
from mmcap.eval.downstream_metrics import sentence_ce
from mmcap.generate.config import GenerationConfig
from mmcap.generate.pipeline import (
    HFPipeline,
    MmcapPipeline,
    caption,
    load_pipeline,
    read_images,
    translate,
)


class DownstreamModel:
    """Args:
    pipe: a :class:`MmcapPipeline` or :class:`HFPipeline`.
    config: generation settings (official: 4 beams, 128 new tokens).
    use_prefix: zero-shot decoder prefix for captioning.
    """

    def __init__(self, pipe, config: GenerationConfig, use_prefix: bool = False):
        self.pipe, self.config, self.use_prefix = pipe, config, use_prefix

    @property
    def image_size(self) -> int:
        return self.pipe.image_size

    def image_error(self, path: str | os.PathLike) -> str | None:
        """None when ``path`` decodes as the model will read it, else the reason."""
        try:
            read_images([path], self.image_size)
        except (ValueError, OSError) as e:
            return str(e)
        return None

    def caption(self, images: list, lang: str) -> list[str]:
        return caption(self.pipe, images, lang, self.use_prefix, self.config)

    def translate(self, sources: list[str], images: list, lang: str) -> list[str]:
        return translate(self.pipe, sources, lang, self.config, images)

    @torch.no_grad()
    def sentence_scores(self, sources: list[str], images: list, lang: str, texts: list[str]):
        """Mean token CE [b] of each ``texts[i]`` as the translation of ``sources[i]``."""
        prompts = [build_prompt(task_string("translation", lang, s)) for s in sources]
        if isinstance(self.pipe, MmcapPipeline):
            return self._mmcap_scores(prompts, images, texts)
        if isinstance(self.pipe, HFPipeline):
            return self._hf_scores(
                [task_string("translation", lang, s) for s in sources], images, texts
            )
        raise TypeError(f"cannot score sentences with {type(self.pipe).__name__}")

    def _mmcap_scores(self, prompts, images, texts):
        p = self.pipe
        ids = p.prompt_tok.encode(prompts)
        prompt = torch.full((len(ids), max(len(x) for x in ids)), p.prompt_tok.pad_id)
        mask = torch.zeros_like(prompt, dtype=torch.bool)
        for i, x in enumerate(ids):
            prompt[i, : len(x)], mask[i, : len(x)] = torch.as_tensor(x), True
        pixels = read_images(images, p.image_size).to(p.device)
        targets = [[int(t) for t in x] for x in p.target_tok.encode(texts)]
        ce = sentence_ce(
            p.model,
            prompt.to(p.device),
            mask.to(p.device),
            targets,
            pixels,
            start_token_id=p.target_tok.decoder_start_id,
        )
        return ce.float().cpu()

    def _hf_scores(self, tasks, images, texts):
        p = self.pipe
        enc = p.processor(text=tasks, image_placeholders=True)  # pixels read below
        pixels = read_images(images, p.image_size)
        tok = p.processor.decoder_tokenizer
        cfg = self.config
        targets = [
            [cfg.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], cfg.eos_token_id]
            for t in texts
        ]
        longest = max(len(t) for t in targets)
        dec = torch.full((len(texts), longest), cfg.pad_token_id, dtype=torch.long)
        labels = torch.full((len(texts), longest), -100, dtype=torch.long)
        for i, t in enumerate(targets):
            labels[i, : len(t)] = torch.as_tensor(t)
            dec[i, 0] = cfg.decoder_start_token_id
            dec[i, 1 : len(t)] = torch.as_tensor(t[:-1])
        logits = p.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values=pixels,
            decoder_input_ids=dec,
        ).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="none"
        )
        return loss.sum(1) / (labels != -100).sum(1)


def load_downstream_model(
    ckpt,
    config: GenerationConfig,
    use_prefix: bool = False,
    input_res: int | None = None,
    bart_tokenizer=None,
    gemma_tokenizer=None,
) -> DownstreamModel:
    """:class:`DownstreamModel` of an mmcap checkpoint or exported HF directory."""
    pipe = load_pipeline(ckpt, input_res, bart_tokenizer, gemma_tokenizer)
    return DownstreamModel(pipe, config, use_prefix)
