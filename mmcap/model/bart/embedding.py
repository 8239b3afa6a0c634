"""BART token + learned position embeddings, as Florence-2's BART encoder and decoder use them.

``embed_scale * word_embeddings(ids)`` (optionally preceded by ready-made embeddings, the
image tokens of the encoder), plus learned absolute positions with BART's offset of 2
(``BartLearnedPositionalEmbedding``), then ``layernorm_embedding`` and dropout. The word
table is a megatron-core VocabParallelEmbedding (rows split over TP).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mmcap.model.norms import layer_norm
from mmcap.parallel.rng import tp_region_rng

BART_POSITION_OFFSET = 2  # transformers' BartLearnedPositionalEmbedding.offset


class BartEmbedding(MegatronModule):
    """Args:
    config: TransformerConfig of the stack (its sequence_parallel decides whether the
        output is scattered to sequence shards).
    vocab_rows: rows of the word table (TP-padded vocabulary).
    hidden_size / max_positions / eps / dropout / scale_embedding: BART fields.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_rows: int,
        hidden_size: int,
        max_positions: int,
        eps: float,
        dropout: float,
        scale_embedding: bool,
    ) -> None:
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            vocab_rows,
            hidden_size,
            init_method=config.init_method,
            config=config,
            tp_group=self.tp_group,
        )
        self.position_embeddings = nn.Embedding(
            max_positions + BART_POSITION_OFFSET, hidden_size, dtype=config.params_dtype
        )
        if config.perform_initialization:
            config.init_method(self.position_embeddings.weight)
        # Position embeddings are computed in full on every TP rank before any scatter.
        self.layernorm_embedding = layer_norm(
            hidden_size, eps, config.sequence_parallel, config.params_dtype
        )
        self.embed_scale = math.sqrt(hidden_size) if scale_embedding else 1.0
        self.dropout = dropout

    def forward(
        self,
        input_ids: torch.Tensor,
        prefix: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        scatter: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids [b, s], prefix [b, n, h] or None -> [(n + s)(/tp), b, h]. position_ids
        [b, n + s] (default 0, 1, ...; a generation step passes its position). ``scatter``
        (packed rows): (ready-made embeddings [m, n, h], flat positions [m * n] into the
        [b * s] tokens) replace the placeholder tokens there, as ``prefix`` does in front."""
        x = self.word_embeddings(input_ids)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if scatter is not None and scatter[1] is not None and scatter[1].numel():
            b, s, h = x.shape
            tokens, index = scatter
            x = x.reshape(b * s, h).index_copy(0, index, tokens.reshape(-1, h).to(x.dtype))
            x = x.view(b, s, h)
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)
        positions = self.position_embeddings(position_ids + BART_POSITION_OFFSET)
        x = (x + positions).transpose(0, 1).contiguous()  # [S, b, h]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x, group=self.tp_group)
        x = self.layernorm_embedding(x)
        if self.training and self.dropout > 0:
            with tp_region_rng(self.config.sequence_parallel):
                x = F.dropout(x, self.dropout, training=True)
        return x
