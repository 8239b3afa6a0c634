"""Generation settings (:class:`GenerationConfig`), defaults = the paper's downstream eval.

The official eval (src/eval.py) calls ``generate(max_new_tokens=128, num_beams=4,
do_sample=False)`` on the language model, whose generation config comes from the checkpoint's
``text_config`` (data/pretrained/*/config.json): ``early_stopping`` true,
``no_repeat_ngram_size`` 3, ``length_penalty`` 1.0, ``decoder_start_token_id`` 1 (eos),
``forced_bos_token_id`` 2, ``forced_eos_token_id`` 1 (null in the FlorenceGemma2-large text
config; set it to None for that model). Token ids are the Gemma decoder's: pad 0, eos 1, bos 2.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationConfig:
    """Args:
    num_beams: 1 = greedy search, > 1 = beam search (HF semantics, one returned sequence).
    max_new_tokens: tokens generated after the decoder prompt.
    length_penalty: finished beam score = sum log p / (new tokens incl. EOS) ** length_penalty.
    early_stopping: True = a sample stops once ``num_beams`` hypotheses finished; False = HF's
        heuristic (stop when the best running beam cannot beat the worst finished one).
    no_repeat_ngram_size: ban tokens that would repeat an n-gram of the sequence (0 = off).
    decoder_start_token_id / bos_token_id / eos_token_id / pad_token_id: Gemma decoder ids.
    forced_bos: force ``bos_token_id`` as the first generated token when the decoder prompt is
        just the start token (HF ``forced_bos_token_id``).
    forced_eos_token_id: forced at the last position allowed by ``max_new_tokens``, or None.
    vocab_limit: ban token ids >= this (e.g. the tokenizer size: the decoder's 1,024 extra
        rows have no text); None = no ban (official).
    use_cache: self-attention KV cache + cross-attention K/V computed once (False = recompute
        the whole decoder every step; same tokens, for tests and the speed comparison).
    """

    num_beams: int = 4
    max_new_tokens: int = 128
    length_penalty: float = 1.0
    early_stopping: bool = True
    no_repeat_ngram_size: int = 3
    decoder_start_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    forced_bos: bool = True
    forced_eos_token_id: int | None = 1
    vocab_limit: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GenerationConfig.{name} must be an int >= 1, got {value!r}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(
                f"GenerationConfig.no_repeat_ngram_size must be >= 0 (0 = off), "
                f"got {self.no_repeat_ngram_size}"
            )
        if not isinstance(self.early_stopping, bool):
            raise ValueError(
                f"GenerationConfig.early_stopping must be True or False, got "
                f"{self.early_stopping!r} (HF's 'never' is not supported)"
            )
