"""The Gemma-2 decoder with gated cross-attention (decoder of the 3.5B and 11.2B models).

A megatron-core ``LanguageModule``: vocab-parallel embedding (scaled by sqrt(hidden)) on the
first pipeline stage, this stage's slice of the layers, final RMSNorm + tied LM head +
final-logit soft-cap + vocab-parallel cross-entropy on the last stage. Pipeline stages are
constructor flags (``pre_process`` / ``post_process``) as in megatron-core's GPT and T5
models; the tied embedding is kept in sync between first and last stage by LanguageModule.

Activations are [sequence, batch, hidden] (megatron-core's layout; a sequence shard with
sequence parallelism). The encoder output is given to every stage in full.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mmcap.config import DecoderConfig
from mmcap.model.gemma2.layer import Gemma2DecoderLayer
from mmcap.model.norms import GemmaRMSNorm
from mmcap.model.pipeline import decoder_layer_range
from mmcap.model.rope import RotaryEmbedding

IGNORE_INDEX = -100  # label value excluded from the loss (HF / PyTorch convention)


class Gemma2Decoder(LanguageModule):
    """Gemma-2 decoder (+ gated cross-attention) for one pipeline stage / virtual chunk.

    Args:
        config: megatron-core TransformerConfig (from
            :func:`mmcap.model.transformer_config.build_decoder_transformer_config`).
        decoder: the mmcap DecoderConfig (Gemma-2 specifics).
        pre_process: build the embedding (first stage).
        post_process: build final norm, LM head and loss (last stage).
        layer_range: [start, end) global layer indices to build; default from the PP rank.
        vp_stage: virtual-pipeline chunk index (interleaved schedule).
    """

    def __init__(
        self,
        config: TransformerConfig,
        decoder: DecoderConfig,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
        vp_stage: int | None = None,
    ) -> None:
        super().__init__(config=config)
        if decoder.arch != "gemma2":
            raise ValueError(
                f"Gemma2Decoder needs DecoderConfig.arch='gemma2', got {decoder.arch!r}"
            )
        self.decoder_config = decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = decoder.tie_word_embeddings
        self.vocab_size = decoder.vocab_size
        self.padded_vocab_size = decoder.padded_vocab_size(config.tensor_model_parallel_size)
        self.input_tensor: torch.Tensor | None = None

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config,
                self.padded_vocab_size,
                decoder.max_position_embeddings,
                position_embedding_type="rope",
                tp_group=self.tp_group,
            )
        # sqrt(hidden) rounded to the activation dtype first, as HF Gemma2 does.
        self.embed_scale = math.sqrt(decoder.hidden_size)
        self.rotary = RotaryEmbedding(decoder.head_dim, decoder.rope_theta)

        if layer_range is None:
            layer_range = decoder_layer_range(
                decoder.num_layers,
                parallel_state.get_pipeline_model_parallel_rank(),
                config.pipeline_model_parallel_size,
                vp_stage,
                config.virtual_pipeline_model_parallel_size,
            )
        self.layer_range = layer_range
        self.layers = nn.ModuleList(
            Gemma2DecoderLayer(config, decoder, i) for i in range(*layer_range)
        )

        if post_process:
            self.final_layernorm = GemmaRMSNorm(
                decoder.hidden_size, decoder.norm_eps, config.sequence_parallel, config.params_dtype
            )
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                decoder.hidden_size,
                self.padded_vocab_size,
                config=config,
                tp_group=self.tp_group,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process
                and self.share_embeddings_and_output_weights,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    def forward(
        self,
        input_ids: torch.Tensor,
        encoder_out: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run this stage.

        Args:
            input_ids: [b, s] decoder input ids (every stage gets them: they size RoPE).
            encoder_out: [s_enc, b, encoder_hidden], the full encoder output (every stage).
            encoder_mask: bool [b, s_enc], True = real encoder token.
            position_ids: [b, s]; default 0..s-1.
            labels: [b, s] targets aligned with input_ids (IGNORE_INDEX = no loss).

        Returns:
            Not last stage: hidden states [s(/tp), b, h]. Last stage: per-token loss [b, s]
            (0 where ignored) if labels is given, else vocab-parallel logits [b, s, V_pad / tp].
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        if self.pre_process:
            hidden = self.embedding(input_ids, position_ids=None)
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        else:
            hidden = self.input_tensor
        rope = self.rotary(position_ids, hidden.dtype)
        if encoder_out is not None and self.config.tensor_model_parallel_size > 1:
            # Identity forward; ONE all-reduce of the encoder-output gradient over TP in
            # backward, for the partial gradients of all layers' linear_kv (see cross_attention).
            encoder_out = tensor_parallel.copy_to_tensor_model_parallel_region(encoder_out)
        for layer in self.layers:
            hidden = layer(hidden, rope, encoder_out, encoder_mask)
        if not self.post_process:
            return hidden
        return self._head(self.final_layernorm(hidden), labels)

    def _head(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V_pad / tp]
        cap = self.decoder_config.final_logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        logits = self._mask_vocab_padding(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        ignore = labels == IGNORE_INDEX
        loss = self.compute_language_model_loss(labels.masked_fill(ignore, 0), logits)
        return loss.masked_fill(ignore, 0.0)

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Rows >= vocab_size exist only to make the vocabulary divisible by TP: give them
        the lowest logit so they take no probability (the model then equals the unpadded one)."""
        if self.padded_vocab_size == self.vocab_size:
            return logits
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        if start + local <= self.vocab_size:
            return logits
        ids = torch.arange(start, start + local, device=logits.device)
        return logits.masked_fill(ids >= self.vocab_size, torch.finfo(logits.dtype).min)
