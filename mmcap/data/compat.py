"""Does a preprocessed dataset fit a model? Checked at startup, before any model is built.

A dataset's manifest records its two tokenizers (kind, file hash, vocabulary size). A dataset
tokenized with a larger vocabulary than the model's embedding tables would index past them
(``IndexError: index out of range in self`` deep inside the first forward); datasets blended
in one run must share their tokenizers.
"""

from __future__ import annotations

from mmcap.config import ConfigError

# manifest "tokenizers" key -> (model config section, what it feeds)
_SIDES = {"prompt": ("encoder", "encoder (BART) prompt"), "target": ("decoder", "decoder target")}


def check_datasets_fit_model(datasets, model_cfg, key: str = "data.train") -> None:
    """Raise ConfigError naming the dataset, tokenizer and fix when a dataset's tokenizer has a
    larger vocabulary than the model (or blended datasets use different tokenizers).

    Args:
        datasets: :class:`mmcap.data.indexed.CaptionDataset` objects.
        key: the configuration key the datasets came from (for the message).
    """
    seen: dict[str, tuple[str, str]] = {}
    for ds in datasets:
        tokenizers = ds.manifest.get("tokenizers") or {}
        for side, (section, what) in _SIDES.items():
            info = tokenizers.get(side)
            if not info:
                continue  # synthetic test data: no tokenizer recorded
            vocab = int(info.get("vocab_size", 0))
            limit = getattr(model_cfg, section).vocab_size
            if vocab > limit:
                raise ConfigError(
                    f"{key}: {ds.path} was tokenized with a {what} tokenizer of {vocab} tokens "
                    f"({info.get('file') or info.get('directory') or info.get('kind')}), but the "
                    f"model's {section} has {limit} (model.{section}.vocab_size); preprocess the "
                    "data with the model's tokenizers, or use the preset / checkpoint that goes "
                    "with this data"
                )
            digest = info.get("sha256")
            if digest is not None:
                first = seen.setdefault(side, (digest, str(ds.path)))
                if first[0] != digest:
                    raise ConfigError(
                        f"{key}: {ds.path} and {first[1]} were tokenized with different {what} "
                        "tokenizers (sha256 differ); preprocess every dataset of a run with the "
                        "same tokenizers"
                    )
