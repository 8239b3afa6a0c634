"""Florence-2's BART encoder over [image tokens ; prompt tokens].

The image tokens (from the vision tower's projector, already encoder-width) are prepended to
the scaled prompt-token embeddings, learned positions run over the whole sequence (as
transformers' Florence2 model, which scatters image features into placeholder positions), then
the post-LN BART layers. The output, [S, b, d] with S = image tokens + prompt tokens, stays in
full on every TP rank (no sequence parallelism): every decoder layer cross-attends to it.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mmcap.config import EncoderConfig
from mmcap.model.bart.embedding import BartEmbedding
from mmcap.model.sharded import stack_sharded_state_dict
from mmcap.model.stage_io import build_encoder_mask
from mmcap.model.te import fp8_layer_context, fp8_stack_context


class BartEncoder(MegatronModule):
    """Args:
    config: the encoder's MMCapTransformerConfig (:func:`build_encoder_transformer_config`).
    encoder: the mmcap EncoderConfig.
    """

    def __init__(self, config: TransformerConfig, encoder: EncoderConfig) -> None:
        super().__init__(config=config)
        self.encoder_config = encoder
        self.embedding = BartEmbedding(
            config,
            encoder.embedding_rows(config.tensor_model_parallel_size),
            encoder.hidden_size,
            encoder.max_position_embeddings,
            encoder.layer_norm_eps,
            encoder.dropout,
            encoder.scale_embedding,
        )
        from mmcap.model.specs import layer_spec  # the specs import the layer modules

        spec = layer_spec(config, decoder=False)
        self.layers = nn.ModuleList(
            build_module(spec, config=config, layer_idx=i) for i in range(encoder.num_layers)
        )

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        packed=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode.

        Args:
            prompt_ids: [b, s] BART token ids.
            prompt_mask: bool [b, s], True = real token (None = no padding).
            image_tokens: [b, n, d] projected image tokens, or None (text only); packed: [m, n, d]
                for the m images of the rows.
            packed: :class:`mmcap.model.stage_io.PackedDocs` of packed rows, or None: the
                image tokens go to ``packed.image_index``, positions restart per document and
                attention stays within it.

        Returns:
            (encoder output [n + s, b, d], mask bool [b, n + s]) — the mask is the
            cross-attention mask of every decoder layer.
        """
        if packed is not None:
            hidden = self.embedding(
                prompt_ids,
                position_ids=packed.encoder_pos,
                scatter=(image_tokens, packed.image_index),
            )
            with fp8_stack_context(self.config):  # null contexts without FP8
                for layer in self.layers:
                    with fp8_layer_context(self.config, layer.layer_idx):
                        hidden = layer(hidden, None, packed.encoder_doc)
            return hidden, packed.encoder_doc >= 0
        b, s = prompt_ids.shape
        if prompt_mask is None:
            prompt_mask = torch.ones(b, s, dtype=torch.bool, device=prompt_ids.device)
        n = image_tokens.shape[1] if image_tokens is not None else 0
        mask = build_encoder_mask(prompt_mask, n)
        hidden = self.embedding(prompt_ids, prefix=image_tokens)
        with fp8_stack_context(self.config):  # null contexts without FP8
            for layer in self.layers:
                with fp8_layer_context(self.config, layer.layer_idx):
                    hidden = layer(hidden, mask)
        return hidden, mask

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return stack_sharded_state_dict(self, prefix, sharded_offsets, metadata, 0)
