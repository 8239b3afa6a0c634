"""The captioning model of one pipeline stage: vision tower + BART encoder + a decoder stage.

Megatron-core style stage flags (as its T5 / LLaVA models): ``add_encoder`` builds the frozen
vision tower and the BART encoder (the first pipeline stage), ``pre_process`` /
``post_process`` the decoder's embedding / head. The encoder output travels with the decoder
activations to every later stage, packed into the one stage tensor
(:mod:`mmcap.model.stage_io`, which also defines the micro-batch every stage consumes).

Freezing (SYSTEM.md "What trains", :class:`mmcap.config.TrainableConfig`): frozen parameters
have ``requires_grad=False`` (so optimizers skip them); the vision tower also stays in eval
mode (unless ``ModelConfig.vision_train_mode``: then it follows the model's mode, drop-path on)
and runs under no_grad; a frozen Gemma decoder still back-propagates to the trainable
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
from mmcap.model.stage_io import build_encoder_mask, pack_stage_output, unpack_stage_input
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
    recompute: activation recompute of the encoder and decoder layers in training: None,
        "selective" (core attention of every layer) or "full" (every layer); the frozen
        vision tower is never recomputed.
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
        recompute: str | None = None,
    ) -> None:
        dec_config = build_decoder_transformer_config(
            model.decoder, parallel, precision, recompute=recompute
        )
        super().__init__(config=dec_config)
        self.model_config = model
        self.model_type = ModelType.encoder_or_decoder
        self.add_encoder, self.pre_process, self.post_process = (
            add_encoder,
            pre_process,
            post_process,
        )
        self.input_tensor: torch.Tensor | None = None
        if add_encoder:
            self.vision = VisionTower(model.vision)
            self.encoder = BartEncoder(
                build_encoder_transformer_config(
                    model.encoder, parallel, precision, recompute=recompute
                ),
                model.encoder,
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
                self.vision.freeze(train_mode=self.model_config.vision_train_mode)
            self.encoder.requires_grad_(policy.encoder)
        if policy.decoder_policy(self.model_config.decoder.arch) == "cross_attention":
            for name, p in self.decoder.named_parameters():
                p.requires_grad_(any(k in f".{name}" for k in _XATTN_TRAINABLE))

    # megatron-core's finalize_model_grads all-reduces the tied embedding / LM-head gradient
    # between first and last pipeline stage through these two decoder attributes.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.decoder.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.decoder.shared_embedding_or_output_weight()

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
        """From the pipeline schedule: the previous stage's packed output (non-first stages)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def encode(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        packed=None,
        image_rows=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision tower (unless precomputed ``image_tokens`` are given) + BART encoder.

        ``has_image`` (bool [b], with pixels or image tokens) marks the samples that have an
        image in a MIXED batch: the others (text-only translations) are encoded from their
        prompt alone, exactly as on their own, and placed behind ``n`` masked rows, so the
        output keeps the layout [n image rows ; prompt rows] of the batch.

        ``image_rows`` (:class:`mmcap.model.stage_io.ImageRows`): the same split as index
        tensors cut on the host; without them it is read from ``has_image`` on the device
        (``nonzero``: a host sync on CUDA).

        ``packed`` (:class:`mmcap.model.stage_io.PackedDocs`): packed rows; ``pixel_values`` /
        ``image_tokens`` then hold the rows' images in order ([m, ...], placed at
        ``packed.image_index``).

        Returns (encoder_out [S, b, d], encoder_mask bool [b, S]).
        """
        if packed is not None:
            if image_tokens is None and pixel_values is not None and len(pixel_values):
                image_tokens = self.vision(pixel_values.to(self.config.params_dtype))
            return self.encoder(prompt_ids, prompt_mask, image_tokens, packed=packed)
        has_images = pixel_values is not None or image_tokens is not None
        if image_rows is not None:  # shapes, not values: no host read
            all_have = image_rows.text.numel() == 0
        else:
            all_have = has_image is None or bool(has_image.all())
        if not has_images or all_have:
            if image_tokens is None and pixel_values is not None:
                image_tokens = self.vision(pixel_values.to(self.config.params_dtype))
            return self.encoder(prompt_ids, prompt_mask, image_tokens)
        b, s_p = prompt_ids.shape
        if prompt_mask is None:
            prompt_mask = torch.ones(b, s_p, dtype=torch.bool, device=prompt_ids.device)
        n = self.model_config.vision.num_image_tokens
        if image_rows is not None:
            img, txt = image_rows.image, image_rows.text
        else:
            img = torch.nonzero(has_image.to(prompt_ids.device)).flatten()
            txt = torch.nonzero(~has_image.to(prompt_ids.device)).flatten()
        d = self.model_config.encoder.hidden_size
        parts = []
        if img.numel():
            tokens = image_tokens[img] if image_tokens is not None else None
            if tokens is None:
                tokens = self.vision(pixel_values[img].to(self.config.params_dtype))
            out_i, _ = self.encoder(prompt_ids[img], prompt_mask[img], tokens)
            parts.append((img, out_i))
        out_t, _ = self.encoder(prompt_ids[txt], prompt_mask[txt], None)
        out_t = torch.nn.functional.pad(out_t, (0, 0, 0, 0, n, 0))  # n masked rows in front
        parts.append((txt, out_t))
        out = out_t.new_zeros(n + s_p, b, d)
        for idx, part in parts:
            out = out.index_copy(1, idx, part)
        return out, build_encoder_mask(prompt_mask, n, has_image)

    def forward(
        self,
        prompt_ids: torch.Tensor | None,
        decoder_input_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        packed=None,
        image_rows=None,
    ):
        """Run this stage.

        Args:
            prompt_ids / prompt_mask: [b, s_p] BART prompt ids, bool mask (first stage).
            decoder_input_ids: [b, s] (every stage).
            pixel_values: [b, 3, H, W] normalised images, or ``image_tokens`` [b, n, d]
                precomputed by the frozen tower (feature cache). Neither = text only.
            has_image: bool [b] with images: which samples have one (mixed batches, see
                :meth:`encode`); None = all. ``image_rows``: the same as host-cut indices
                (:class:`mmcap.model.stage_io.ImageRows`), or None.
            labels: [b, s] targets (IGNORE_INDEX = no loss), last stage.
            encoder_mask: bool [b, S] (non-first stages: the first stage's encoder mask, which
                the data pipeline rebuilds from the prompt mask and image token count; its
                length S also sizes the packed encoder output).
            packed: :class:`mmcap.model.stage_io.PackedDocs` for packed rows (sequence
                packing; every stage), else None.

        Returns:
            Last stage: per-token loss [b, s] with labels, else logits [b, s, V_pad / tp].
            Other stages: the packed ``[decoder_hidden ; encoder_out]`` for the next stage.
        """
        if self.add_encoder:
            encoder_out, encoder_mask = self.encode(
                prompt_ids, prompt_mask, pixel_values, image_tokens, has_image, packed, image_rows
            )
        else:
            if self.input_tensor is None or encoder_mask is None:
                raise ValueError(
                    "a stage without the encoder needs set_input_tensor(previous "
                    "stage output) and encoder_mask"
                )
            hidden, encoder_out = unpack_stage_input(
                self.input_tensor, encoder_mask.shape[1], self.model_config.encoder.hidden_size
            )
            self.decoder.set_input_tensor(hidden)
        if packed is None:
            out = self.decoder(decoder_input_ids, encoder_out, encoder_mask, labels=labels)
        else:
            out = self.decoder(
                decoder_input_ids,
                encoder_out,
                encoder_mask,
                position_ids=packed.decoder_pos,
                labels=labels,
                docs=(packed.decoder_doc, packed.encoder_doc),
            )
        if self.post_process:
            return out
        return pack_stage_output(out, encoder_out)
