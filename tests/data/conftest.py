"""Fixtures of the data tests: tiny tokenizers built once per session (no hub)."""

import pytest

from mmcap.data.testing import build_tiny_bart_tokenizer, build_tiny_gemma_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizers(tmp_path_factory):
    """(Gemma-like tokenizer.model path, BART-like tokenizer directory) as strings."""
    root = tmp_path_factory.mktemp("tokenizers")
    return str(build_tiny_gemma_tokenizer(root / "gemma")), str(
        build_tiny_bart_tokenizer(root / "bart")
    )


@pytest.fixture(scope="session")
def loaded_tokenizers(tiny_tokenizers):
    """(TargetTokenizer, PromptTokenizer) over the tiny models."""
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer

    gemma, bart = tiny_tokenizers
    return TargetTokenizer(gemma), PromptTokenizer(bart)
