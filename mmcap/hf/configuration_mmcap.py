"""Hugging Face config of mmcap's captioners: :class:`MmcapCaptionerConfig`.

One config for both model families (SYSTEM.md "The four models"):

- ``decoder_family="florence"``: Florence-2 DaViT + BART encoder + BART decoder over the Gemma-2
  vocabulary. ``text_config`` (a :class:`~transformers.BartConfig`) describes both BART stacks.
- ``decoder_family="gemma2"``: the same vision tower and BART encoder, and a Gemma-2 decoder with
  gated cross-attention in every layer, described by ``gemma_config`` (a
  :class:`~transformers.Gemma2Config` with the extra field ``encoder_hidden_size``).

The two embedding tables have their own row counts, ``encoder_vocab_size`` (BART vocabulary:
51,328 rows for the Florence sizes, 51,289 for the Gemma sizes) and ``decoder_vocab_size``
(Gemma vocabulary: 257,024 / 256,000). These two fields are the source of truth: the
``vocab_size`` of the sub-configs is set from them (when left ``None`` they are read from the
sub-configs). Special ids at the top level are the Gemma (decoder) ids, pad 0, eos 1, bos 2,
decoder start 1; ``text_config``'s ids stay the BART tokenizer's (encoder side, pad 1).
"""

from __future__ import annotations

import copy
from typing import ClassVar

from huggingface_hub.dataclasses import strict
from transformers import BartConfig, Florence2VisionConfig, Gemma2Config, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

DECODER_FAMILIES = ("florence", "gemma2")


@strict
class MmcapCaptionerConfig(PretrainedConfig):
    """Config of :class:`~mmcap.hf.modeling_mmcap.MmcapCaptionerForConditionalGeneration`.

    Args:
        vision_config: Florence-2 DaViT config (dict or :class:`Florence2VisionConfig`).
        text_config: BART config of the encoder (and of the decoder, Florence family).
        gemma_config: Gemma-2 decoder config plus ``encoder_hidden_size`` (width of the encoder
            output the cross-attention k/v project from; defaults to ``text_config.d_model``).
            Required for ``decoder_family="gemma2"``, must be None for ``"florence"``.
        decoder_family: "florence" (BART decoder) or "gemma2" (Gemma-2 + gated cross-attention).
        encoder_vocab_size: rows of the encoder embedding table (default ``text_config.vocab_size``).
        decoder_vocab_size: rows of the decoder embedding table and LM head (default: the
            decoder sub-config's ``vocab_size``).
        image_token_id: placeholder id in ``input_ids`` where image features go; may lie outside
            the encoder table (Gemma sizes: 51,289 with a 51,289-row table).
        pad_token_id, eos_token_id, bos_token_id, decoder_start_token_id: decoder (Gemma) ids.
        final_logit_softcapping: Florence family: ``cap * tanh(logits / cap)`` on the LM-head
            logits (30 for the paper's Florence sizes: the official Florence-2 language model
            hard-codes it); None = no cap (transformers' native Florence-2). The Gemma family
            reads ``gemma_config.final_logit_softcapping`` instead and must leave this None.
    """

    model_type = "mmcap_captioner"
    sub_configs_defaults: ClassVar[dict] = {
        "vision_config": Florence2VisionConfig,
        "text_config": BartConfig,
        "gemma_config": SubConfigSpec(config_class=Gemma2Config, optional=True),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    gemma_config: dict | PretrainedConfig | None = None
    decoder_family: str = "florence"
    encoder_vocab_size: int | None = None
    decoder_vocab_size: int | None = None
    image_token_id: int = 51289
    pad_token_id: int | None = 0
    eos_token_id: int | None = 1
    bos_token_id: int | None = 2
    decoder_start_token_id: int | None = 1
    final_logit_softcapping: float | None = None
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.decoder_family not in DECODER_FAMILIES:
            raise ValueError(
                f"decoder_family must be one of {DECODER_FAMILIES}, got {self.decoder_family!r}"
            )
        cap = self.final_logit_softcapping
        if cap is not None and not (self.decoder_family == "florence" and cap > 0):
            raise ValueError(
                f"final_logit_softcapping={cap!r}: must be None or > 0, and only for "
                "decoder_family='florence' (the Gemma family uses gemma_config's field)"
            )
        if self.encoder_vocab_size is None:
            self.encoder_vocab_size = self.text_config.vocab_size
        self.text_config.vocab_size = self.encoder_vocab_size
        if self.decoder_family == "florence":
            if self.gemma_config is not None:
                raise ValueError(
                    "gemma_config is set but decoder_family='florence'; drop gemma_config or set "
                    "decoder_family='gemma2'"
                )
            if self.decoder_vocab_size is None:
                self.decoder_vocab_size = self.encoder_vocab_size
            return
        if self.gemma_config is None:
            raise ValueError("decoder_family='gemma2' needs gemma_config (a Gemma2Config or dict)")
        if getattr(self.gemma_config, "encoder_hidden_size", None) is None:
            self.gemma_config.encoder_hidden_size = self.text_config.d_model
        if self.gemma_config.encoder_hidden_size != self.text_config.d_model:
            raise ValueError(
                f"gemma_config.encoder_hidden_size={self.gemma_config.encoder_hidden_size} but the "
                f"BART encoder width text_config.d_model={self.text_config.d_model}; make them equal"
            )
        if self.decoder_vocab_size is None:
            self.decoder_vocab_size = self.gemma_config.vocab_size
        self.gemma_config.vocab_size = self.decoder_vocab_size

    def encoder_config(self) -> BartConfig:
        """The BART config the encoder is built from (``vocab_size`` = encoder rows)."""
        return self.text_config

    def decoder_config(self) -> PretrainedConfig:
        """The config the decoder is built from: ``gemma_config`` (Gemma family), else a copy of
        ``text_config`` with the decoder vocabulary and the decoder's special ids."""
        if self.decoder_family == "gemma2":
            return self.gemma_config
        cfg = copy.deepcopy(self.text_config)
        cfg.vocab_size = self.decoder_vocab_size
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"):
            setattr(cfg, name, getattr(self, name))
        # BartConfig's forced_eos_token_id (2 = BART </s>) would be read as a generation default;
        # 2 is Gemma's <bos>, so it must not be forced on the Gemma-vocabulary decoder.
        cfg.forced_eos_token_id = None
        return cfg

    def logit_softcap(self) -> float | None:
        """The final logit soft-cap of the decoder family (None = none)."""
        if self.decoder_family == "gemma2":
            return self.gemma_config.final_logit_softcapping
        return self.final_logit_softcapping

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        """Encoder side -> ``text_config``; decoder side (and "both", which generation uses for
        the logits vocabulary) -> :meth:`decoder_config`."""
        if encoder and not decoder:
            return self.encoder_config()
        return self.decoder_config()


__all__ = ["DECODER_FAMILIES", "MmcapCaptionerConfig"]
