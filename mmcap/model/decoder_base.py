"""What every mmcap text decoder shares, as a megatron-core ``LanguageModule``.

A decoder stage owns: the token embedding (first pipeline stage, ``pre_process``), its slice of
the layers (``layer_range``, global indices), and the head (last stage, ``post_process``):
optional final norm, tied vocab-parallel LM head, optional final-logit soft-cap, masking of the
TP vocabulary padding (logits out), or with labels the fused vocab-parallel soft-capped
cross-entropy of mmcap.ops.softcap_ce (per-token loss out, no full logits). The tied embedding is
kept in sync between first and last stage by LanguageModule. The layers come from the
config's ModuleSpec (:mod:`mmcap.model.specs`); subclasses (Gemma-2, BART) provide the
embedding and the final norm.

Activations are [sequence, batch, hidden] (a sequence shard with sequence parallelism). The
encoder output is given to every stage in full.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mmcap.config import IGNORE_INDEX, DecoderConfig
from mmcap.model.pipeline import decoder_layer_range
from mmcap.model.sharded import stack_sharded_state_dict
from mmcap.model.te import fp8_layer_context, fp8_stack_context
from mmcap.ops.softcap_ce import softcap_ce

__all__ = ["IGNORE_INDEX", "DecoderLanguageModel"]


class DecoderLanguageModel(LanguageModule, metaclass=ABCMeta):
    """Base class of the decoder of one pipeline stage / virtual chunk.

    Args:
        config: the decoder's MMCapTransformerConfig (its layers' shapes, numerics and spec).
        decoder: the mmcap DecoderConfig.
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
        self.decoder_config = decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = decoder.tie_word_embeddings
        self.vocab_size = decoder.vocab_size
        self.padded_vocab_size = decoder.padded_vocab_size(config.tensor_model_parallel_size)
        self.input_tensor: torch.Tensor | None = None
        if pre_process:
            self.embedding = self.build_embedding()
        if layer_range is None:
            layer_range = decoder_layer_range(
                decoder.num_layers,
                parallel_state.get_pipeline_model_parallel_rank(),
                config.pipeline_model_parallel_size,
                vp_stage,
                config.virtual_pipeline_model_parallel_size,
            )
        self.layer_range = layer_range
        self.layers = nn.ModuleList(self.build_layer(i) for i in range(*layer_range))
        if post_process:
            self.final_layernorm = self.build_final_norm()
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

    # --- subclass hooks -------------------------------------------------------------------
    @abstractmethod
    def build_embedding(self) -> nn.Module:
        """Module with a ``word_embeddings`` VocabParallelEmbedding (tied to the LM head)."""

    def build_layer(self, layer_idx: int) -> nn.Module:
        """Layer with global index ``layer_idx`` from the stack's ModuleSpec (arch and
        ``transformer_impl`` of the config, :mod:`mmcap.model.specs`); called as
        ``layer(hidden, layer_context, encoder_out, encoder_mask, decoder_doc, encoder_doc)``."""
        from megatron.core.transformer.spec_utils import build_module

        from mmcap.model.specs import layer_spec  # the specs import the layer modules

        return build_module(layer_spec(self.config), config=self.config, layer_idx=layer_idx)

    @abstractmethod
    def build_final_norm(self) -> nn.Module | None:
        """Norm before the LM head, or None (BART has none)."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] ids -> [s(/tp), b, h] first-stage hidden states."""

    def layer_context(self, position_ids: torch.Tensor):
        """Per-forward inputs every layer of the stage shares (e.g. RoPE tables); None here."""
        return

    # --- shared ---------------------------------------------------------------------------
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
        docs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run this stage.

        Args:
            input_ids: [b, s] decoder input ids (every stage gets them: they size positions).
            encoder_out: [s_enc, b, encoder_hidden], the full encoder output (every stage).
            encoder_mask: bool [b, s_enc], True = real encoder token.
            position_ids: [b, s]; default 0..s-1.
            labels: [b, s] targets aligned with input_ids (IGNORE_INDEX = no loss).
            docs: packed rows: (decoder doc ids [b, s], encoder doc ids [b, s_enc]); with
                them ``position_ids`` are the in-document positions and ``encoder_mask`` is
                not used (the ids carry the padding).

        Returns:
            Not last stage: hidden states [s(/tp), b, h]. Last stage: per-token loss [b, s]
            (0 where ignored) if labels is given, else vocab-parallel logits [b, s, V_pad / tp].
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        hidden = self.embed(input_ids, position_ids) if self.pre_process else self.input_tensor
        if encoder_out is not None and self.config.tensor_model_parallel_size > 1:
            # Identity forward; ONE all-reduce over TP of the encoder-output gradient in
            # backward, for the partial gradients of every layer's linear_kv.
            encoder_out = tensor_parallel.copy_to_tensor_model_parallel_region(encoder_out)
        ctx = self.layer_context(position_ids)
        docs = docs or (None, None)
        with fp8_stack_context(self.config):  # null contexts without FP8
            for layer in self.layers:
                with fp8_layer_context(self.config, layer.layer_idx):
                    hidden = layer(hidden, ctx, encoder_out, encoder_mask, *docs)
        if not self.post_process:
            return hidden
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return self._head(hidden, labels)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """TP-sharded tensors under GLOBAL layer indices; the last stage's LM-head copy of the
        tied embedding is a replica of the first stage's table (LanguageModule's tying)."""
        sd = stack_sharded_state_dict(self, prefix, sharded_offsets, metadata, self.layer_range[0])
        if self.share_embeddings_and_output_weights:
            self.tie_embeddings_and_output_weights_state_dict(
                sd,
                f"{prefix}output_layer.weight",
                f"{prefix}embedding.word_embeddings.weight",
                metadata or {},
            )
        return sd

    def _head(self, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        if labels is not None:
            return self._head_loss(hidden, labels, weight)
        logits, _ = self.output_layer(hidden, weight=weight)  # [s, b, V_pad / tp]
        cap = self.decoder_config.final_logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return self._mask_vocab_padding(logits).transpose(0, 1).contiguous()

    def _head_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-token loss [b, s] (float32, 0 where ignored) of the LM head + final soft-cap +
        vocab-parallel CE, fused (mmcap.ops.softcap_ce: CUDA kernels when built, its plain-torch
        reference else); the logits are never materialised whole. The input mapping is
        output_layer's own (its backward reduces dh over TP); mmcap uses neither gradient-
        accumulation fusion nor overlapped param gathers, which output_layer would handle."""
        layer = self.output_layer
        if layer.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward reduce-scatters
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=True, group=self.tp_group
            )
        elif layer.allreduce_dgrad:  # identity; backward all-reduces dh
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(
                hidden, group=self.tp_group
            )
        weight = layer.weight if weight is None else weight  # [V_pad / tp, h]
        s, b, h = hidden.shape
        loss = softcap_ce(
            hidden.reshape(s * b, h),
            weight,
            labels.t().reshape(s * b),  # [b, s] -> the [s, b] token order of hidden
            cap=self.decoder_config.final_logit_softcap,
            vocab_start=parallel_state.get_tensor_model_parallel_rank() * weight.shape[0],
            vocab_size=self.vocab_size,
            tp_group=self.tp_group,
        )
        return loss.view(s, b).t().contiguous()

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
