"""Hugging Face model classes of mmcap's captioners, built from transformers' own modules.

transformers' native ``Florence2ForConditionalGeneration`` ties encoder and decoder embeddings
into one ``shared`` table; every mmcap model has a BART encoder vocabulary and a Gemma decoder
vocabulary, so these classes keep two tables. One class serves both families, switching on
``config.decoder_family``: Florence2VisionBackbone + Florence2MultiModalProjector + BartEncoder,
then BartDecoder ("florence") or :class:`~mmcap.hf.modeling_gemma_xattn.MmcapGemma2XAttnDecoder`
("gemma2"). Parameter names equal the native Florence-2 / Gemma-2 ones wherever the part is the
same. ``save_pretrained`` writes every state-dict key below except ``lm_head.weight`` (tied
to the decoder ``embed_tokens``). Templates: {i} layer, {s} DaViT stage, {b} block of a stage,
{x,y} one of the names (tests/hf check this list against the real keys)::

  Both families:
    model.vision_tower.convs.{s}.{conv,norm}.{weight,bias}
    model.vision_tower.blocks.{s}.{b}.{spatial_block,channel_block}.{conv1,conv2}.{weight,bias}
    model.vision_tower.blocks.{s}.{b}.{spatial_block,channel_block}.{norm1,norm2}.{weight,bias}
    model.vision_tower.blocks.{s}.{b}.spatial_block.window_attn.{qkv,proj}.{weight,bias}
    model.vision_tower.blocks.{s}.{b}.channel_block.channel_attn.{qkv,proj}.{weight,bias}
    model.vision_tower.blocks.{s}.{b}.{spatial_block,channel_block}.ffn.{fc1,fc2}.{weight,bias}
    model.multi_modal_projector.image_projection.weight
    model.multi_modal_projector.image_proj_norm.{weight,bias}
    model.multi_modal_projector.image_position_embed.{row,column}_embeddings.weight
    model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed  (persistent buffer)
    model.language_model.encoder.embed_tokens.weight  [encoder_vocab_size, d_model]
    model.language_model.encoder.embed_positions.weight
    model.language_model.encoder.layernorm_embedding.{weight,bias}
    model.language_model.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    model.language_model.encoder.layers.{i}.self_attn_layer_norm.{weight,bias}
    model.language_model.encoder.layers.{i}.{fc1,fc2,final_layer_norm}.{weight,bias}
    lm_head.weight  [decoder_vocab_size, hidden], tied to the decoder embed_tokens

  Florence family (BartDecoder, native names; native ``shared`` -> the two embed_tokens):
    model.language_model.decoder.embed_tokens.weight  [decoder_vocab_size, d_model]
    model.language_model.decoder.embed_positions.weight
    model.language_model.decoder.layernorm_embedding.{weight,bias}
    model.language_model.decoder.layers.{i}.{self_attn,encoder_attn}.{q,k,v,out}_proj.{weight,bias}
    model.language_model.decoder.layers.{i}.{self_attn,encoder_attn}_layer_norm.{weight,bias}
    model.language_model.decoder.layers.{i}.{fc1,fc2,final_layer_norm}.{weight,bias}

  Gemma family (Gemma2Model names + the cross-attention block, no biases):
    model.language_model.decoder.embed_tokens.weight  [decoder_vocab_size, hidden]
    model.language_model.decoder.norm.weight
    model.language_model.decoder.layers.{i}.input_layernorm.weight
    model.language_model.decoder.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.language_model.decoder.layers.{i}.post_attention_layernorm.weight
    model.language_model.decoder.layers.{i}.encoder_attn.{q,k,v,o}_proj.weight
    model.language_model.decoder.layers.{i}.encoder_attn_gate  [1]
    model.language_model.decoder.layers.{i}.post_encoder_attention_layernorm.weight
    model.language_model.decoder.layers.{i}.pre_feedforward_layernorm.weight
    model.language_model.decoder.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.language_model.decoder.layers.{i}.post_feedforward_layernorm.weight
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.bart.modeling_bart import BartDecoder, BartEncoder
from transformers.models.florence2.modeling_florence2 import (
    Florence2MultiModalProjector,
    Florence2PreTrainedModel,
    Florence2Seq2SeqLMOutput,
    Florence2Seq2SeqModelOutput,
    Florence2VisionBackbone,
    shift_tokens_right,
)

from mmcap.config import IGNORE_INDEX
from mmcap.hf.configuration_mmcap import MmcapCaptionerConfig
from mmcap.hf.modeling_gemma_xattn import MmcapGemma2XAttnDecoder


class MmcapCaptionerPreTrainedModel(Florence2PreTrainedModel):
    """Florence-2's init (incl. the cosine temporal embedding) with mmcap's config. The Gemma
    family is verified with eager attention only, so it claims no other back-end."""

    config: MmcapCaptionerConfig
    config_class = MmcapCaptionerConfig
    # The placeholder-count check in embed_encoder_inputs syncs with the host.
    _can_compile_fullgraph = False
    _no_split_modules: ClassVar[list[str]] = [
        "Florence2VisionBlock",
        "BartEncoderLayer",
        "BartDecoderLayer",
        "MmcapGemma2XAttnDecoderLayer",
    ]

    @property
    def _supports_sdpa(self) -> bool:
        return self.config.decoder_family == "florence"

    @property
    def _supports_flash_attn(self) -> bool:
        return self.config.decoder_family == "florence"

    @property
    def _supports_flex_attn(self) -> bool:
        return self.config.decoder_family == "florence"


class MmcapLanguageModel(nn.Module):
    """Encoder + decoder under ``model.language_model`` (BartModel's names, no ``shared``).

    Args:
        config: the captioner config; the encoder has ``encoder_vocab_size`` rows, the decoder
            ``decoder_vocab_size``.
    """

    def __init__(self, config: MmcapCaptionerConfig):
        super().__init__()
        self.encoder = BartEncoder(config.encoder_config())
        if config.decoder_family == "gemma2":
            self.decoder = MmcapGemma2XAttnDecoder(config.decoder_config())
        else:
            self.decoder = BartDecoder(config.decoder_config())


class MmcapCaptionerModel(MmcapCaptionerPreTrainedModel):
    """Vision tower, projector, encoder and decoder; returns decoder states (no LM head).

    Args:
        config: the captioner config.
    """

    def __init__(self, config: MmcapCaptionerConfig):
        super().__init__(config)
        self.vision_tower = Florence2VisionBackbone(config=config.vision_config)
        self.multi_modal_projector = Florence2MultiModalProjector(config)
        self.language_model = MmcapLanguageModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.decoder.embed_tokens = value

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        if modality is None:
            return self.language_model.encoder
        return super().get_encoder(modality=modality)

    def get_decoder(self) -> nn.Module:
        return self.language_model.decoder

    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs
    ) -> BaseModelOutputWithPooling:
        """DaViT states, projected image tokens in ``pooler_output`` [B, 1 + N*N, d_model]."""
        out = self.vision_tower(pixel_values, **kwargs)
        out.pooler_output = self.multi_modal_projector(out.last_hidden_state)
        return out

    def embed_encoder_inputs(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder input embeddings: BART token rows, image features at the placeholders.

        The image token id may lie outside the encoder table, so placeholders are looked up as
        the BART pad id first and then overwritten (Florence2Model's masked_scatter).
        """
        is_image = input_ids == self.config.image_token_id  # [B, S]
        ids = input_ids.masked_fill(is_image, self.config.text_config.pad_token_id)
        embeds = self.language_model.encoder.embed_tokens(ids)
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"input_ids hold {n_tokens} image placeholders "
                    f"(id {self.config.image_token_id}) but no pixel_values were given"
                )
            return embeds
        features = self.get_image_features(pixel_values).pooler_output.to(embeds)
        if n_tokens != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids hold {n_tokens} image placeholders but the images give "
                f"{features.shape[0]} x {features.shape[1]} features; the processor's "
                "num_image_tokens must match the image size"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), features)

    def encode(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Encoder output for ``input_ids`` (with image placeholders) and ``pixel_values``."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_encoder_inputs(input_ids, pixel_values)
        return self.language_model.encoder(
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> Florence2Seq2SeqModelOutput:
        """Florence2Model's arguments; ``attention_mask`` is the encoder padding mask."""
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, pixel_values, attention_mask, inputs_embeds)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        enc = encoder_outputs.last_hidden_state
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = torch.full(
                (enc.shape[0], 1), self.config.decoder_start_token_id, device=enc.device
            )
        dec = self.language_model.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=enc,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
        )
        return Florence2Seq2SeqModelOutput(
            last_hidden_state=dec.last_hidden_state,
            past_key_values=dec.past_key_values,
            encoder_last_hidden_state=enc,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


class MmcapCaptionerForConditionalGeneration(MmcapCaptionerPreTrainedModel, GenerationMixin):
    """mmcap captioner with an LM head over the decoder vocabulary; both families.

    Args:
        config: the captioner config (``decoder_family`` picks the decoder).
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {
        "lm_head.weight": "model.language_model.decoder.embed_tokens.weight"
    }

    def __init__(self, config: MmcapCaptionerConfig):
        super().__init__(config)
        self.model = MmcapCaptionerModel(config)
        hidden = config.decoder_config().hidden_size
        self.lm_head = nn.Linear(hidden, config.decoder_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return self.model.get_encoder(modality=modality)

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def get_image_features(
        self, pixel_values: torch.Tensor, **kwargs
    ) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> Florence2Seq2SeqLMOutput:
        """Florence2ForConditionalGeneration's arguments; logits over the decoder vocabulary.

        Args:
            input_ids: encoder ids [B, S] with ``image_token_id`` placeholders.
            pixel_values: images [B, 3, H, W] (normalised).
            attention_mask: encoder padding mask [B, S].
            decoder_input_ids: decoder ids [B, T]; from ``labels`` (shift right, start id 1)
                when None.
            labels: targets [B, T], -100 = ignored; loss = mean CE over the others.
            logits_to_keep: keep only the last N positions' logits (0 = all).
        """
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=encoder_outputs,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
        )
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        cap = self.config.logit_softcap()  # Gemma-2's 30; Florence sizes: official 30
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits.float().flatten(0, 1),
                labels.to(logits.device).flatten(),
                ignore_index=IGNORE_INDEX,
            )
        return Florence2Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            encoder_last_hidden_state=out.encoder_last_hidden_state,
            encoder_hidden_states=out.encoder_hidden_states,
            encoder_attentions=out.encoder_attentions,
        )

    # --- generation hooks -------------------------------------------------------------------
    def _maybe_prepare_encoder_kwargs_for_generation(
        self,
        inputs_tensor: torch.Tensor,
        model_kwargs: dict[str, Any],
        model_input_name,
        generation_config,
    ) -> dict[str, Any]:
        """Run vision tower + encoder once before decoding (image features merged first)."""
        if model_kwargs.get("encoder_outputs") is not None:
            return model_kwargs
        inputs_embeds = model_kwargs.pop("inputs_embeds", None)
        if model_kwargs.get("attention_mask") is None and inputs_embeds is None:
            # transformers builds no mask for encoder-decoder models: mask BART <pad> here, for
            # the encoder and (kept in model_kwargs) the decoder's cross-attention.
            model_kwargs["attention_mask"] = self._prepare_attention_mask_for_generation(
                inputs_tensor, generation_config, model_kwargs
            )
        model_kwargs["encoder_outputs"] = self.model.encode(
            input_ids=None if inputs_embeds is not None else inputs_tensor,
            pixel_values=model_kwargs.pop("pixel_values", None),
            attention_mask=model_kwargs.get("attention_mask"),
            inputs_embeds=inputs_embeds,
        )
        return model_kwargs

    def _prepare_attention_mask_for_generation(
        self, inputs_tensor: torch.Tensor, generation_config, model_kwargs: dict[str, Any]
    ) -> torch.LongTensor:
        """Encoder mask from the BART pad id (the generation config's pad id is Gemma's 0, which
        is BART's ``<s>``); used when ``generate`` gets no attention_mask."""
        if inputs_tensor.ndim == 2 and not inputs_tensor.is_floating_point():
            return inputs_tensor.ne(self.config.text_config.pad_token_id).long()
        return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """GenerationMixin's cache, with a full (non-sliding) cross-attention half for Gemma."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if self.config.decoder_family == "gemma2" and isinstance(cache, EncoderDecoderCache):
            MmcapGemma2XAttnDecoder.full_cross_attention_cache(cache)


__all__ = [
    "MmcapCaptionerForConditionalGeneration",
    "MmcapCaptionerModel",
    "MmcapCaptionerPreTrainedModel",
]
