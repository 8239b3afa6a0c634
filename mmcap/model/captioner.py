"""The captioning model of one pipeline stage: vision tower + BART encoder + a decoder stage.

Megatron-core style stage flags (as its T5 / LLaVA models): ``add_encoder`` builds the frozen
vision tower and the BART encoder (the first pipeline stage), ``pre_process`` /
``post_process`` the decoder's embedding / head. The encoder output travels with the decoder
activations to every later stage: a non-first stage takes ``[decoder_hidden, encoder_out]``
through :meth:`set_input_tensor` and a non-last stage returns the same pair, so each stage's
cross-attention reads it and its gradient flows back to the encoder through the pipeline.

Freezing (SYSTEM.md "What trains", :class:`mmcap.config.TrainableConfig`): frozen parameters
have ``requires_grad=False`` (so optimizers skip them); the vision tower also stays in eval
mode and runs under no_grad; a frozen Gemma decoder still back-propagates to the trainable
cross-attention and embeddings that feed it.
"""

from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from mmcap.config import ModelConfig, ParallelConfig, PrecisionConfig
from mmcap.model.bart.decoder import FlorenceDecoder
from mmcap.model.bart.encoder import BartEncoder
from mmcap.model.gemma2.decoder import Gemma2Decoder
from mmcap.model.transformer_config import (
    build_decoder_transformer_config,
    build_encoder_transformer_config,
)
from mmcap.model.vision import VisionTower

# Decoder parameters that train under the "cross_attention" policy (Gemma sizes): the gated
# cross-attention blocks (projections, gate, post-norm) and the tied embedding / LM head.
_XATTN_TRAINABLE = (".cross_attention.", "embedding.word_embeddings.", "output_layer.")


class CaptioningModel(MegatronModule):
    """Args:
    model: the model config (a preset or custom).
    parallel / precision: layout and dtype.
    add_encoder: build vision tower + encoder on this stage (first pipeline stage).
    pre_process / post_process: decoder embedding / head on this stage.
    layer_range / vp_stage: the decoder layers of this stage (default from the PP rank).
    """

    def __init__(
        self,
        model: ModelConfig,
        parallel: ParallelConfig | None = None,
        precision: PrecisionConfig | None = None,
        *,
        add_encoder: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
        vp_stage: int | None = None,
    ) -> None:
        dec_config = build_decoder_transformer_config(model.decoder, parallel, precision)
        super().__init__(config=dec_config)
        self.model_config = model
        self.model_type = ModelType.encoder_or_decoder
        self.add_encoder, self.pre_process, self.post_process = (
            add_encoder,
            pre_process,
            post_process,
        )
        self.input_tensor: list[torch.Tensor] | None = None
        if add_encoder:
            self.vision = VisionTower(model.vision)
            self.encoder = BartEncoder(
                build_encoder_transformer_config(model.encoder, parallel, precision), model.encoder
            )
            self.vision.to(dec_config.params_dtype)
        decoder_cls = Gemma2Decoder if model.decoder.arch == "gemma2" else FlorenceDecoder
        self.decoder = decoder_cls(
            dec_config,
            model.decoder,
            pre_process=pre_process,
            post_process=post_process,
            layer_range=layer_range,
            vp_stage=vp_stage,
        )
        self.apply_trainable()

    def apply_trainable(self) -> None:
        """Set requires_grad (and the vision tower's frozen mode) from ``model.trainable``."""
        policy = self.model_config.trainable
        if self.add_encoder:
            if policy.vision:
                self.vision.requires_grad_(True)
            else:
                self.vision.freeze()
            self.encoder.requires_grad_(policy.encoder)
        if policy.decoder_policy(self.model_config.decoder.arch) == "cross_attention":
            for name, p in self.decoder.named_parameters():
                p.requires_grad_(any(k in f".{name}" for k in _XATTN_TRAINABLE))

    def global_name(self, name: str) -> str:
        """TP/PP-independent name of local parameter ``name``: decoder layers get their global
        index; the last stage's tied LM head is the decoder embedding."""
        if name.startswith("decoder.layers."):
            i, rest = name[len("decoder.layers.") :].split(".", 1)
            return f"decoder.layers.{int(i) + self.decoder.layer_range[0]}.{rest}"
        if (
            name == "decoder.output_layer.weight"
            and self.decoder.share_embeddings_and_output_weights
        ):
            return "decoder.embedding.word_embeddings.weight"
        return name

    def set_input_tensor(self, input_tensor) -> None:
        """From the pipeline schedule: ``[decoder_hidden, encoder_out]`` (non-first stages)."""
        if not isinstance(input_tensor, (list, tuple)):
            input_tensor = [input_tensor]
        self.input_tensor = list(input_tensor)
        self.decoder.set_input_tensor(self.input_tensor[0])

    def encode(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision tower (unless precomputed ``image_tokens`` are given) + BART encoder.

        Returns (encoder_out [S, b, d], encoder_mask bool [b, S]).
        """
        if image_tokens is None and pixel_values is not None:
            image_tokens = self.vision(pixel_values.to(self.config.params_dtype))
        return self.encoder(prompt_ids, prompt_mask, image_tokens)

    def forward(
        self,
        prompt_ids: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
    ):
        """Run this stage.

        Args:
            prompt_ids / prompt_mask: [b, s_p] BART prompt ids, bool mask (first stage).
            decoder_input_ids: [b, s] (every stage).
            pixel_values: [b, 3, H, W] normalised images, or ``image_tokens`` [b, n, d]
                precomputed by the frozen tower (feature cache). Neither = text only.
            labels: [b, s] targets (IGNORE_INDEX = no loss), last stage.
            encoder_mask: bool [b, S] (non-first stages: the first stage's encoder mask, which
                the data pipeline can rebuild from the prompt mask and image token count).

        Returns:
            Last stage: per-token loss [b, s] with labels, else logits [b, s, V_pad / tp].
            Other stages: ``[decoder_hidden, encoder_out]`` for the next stage.
        """
        if self.add_encoder:
            encoder_out, encoder_mask = self.encode(
                prompt_ids, prompt_mask, pixel_values, image_tokens
            )
        else:
            if self.input_tensor is None or len(self.input_tensor) < 2:
                raise ValueError(
                    "a stage without the encoder needs set_input_tensor("
                    "[decoder_hidden, encoder_out]) from the previous stage"
                )
            encoder_out = self.input_tensor[1]
        out = self.decoder(decoder_input_ids, encoder_out, encoder_mask, labels=labels)
        if self.post_process:
            return out
        return [out, encoder_out]
