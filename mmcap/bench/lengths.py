"""Per-key sample lengths for benchmarks and the packing report: what a real task-language
balanced batch looks like, without reading a dataset.

A :class:`LengthModel` holds, per task-language key, the mean and maximum prompt (BART) and
target (Gemma) token counts and the fraction of its samples that carry an image. In the
paper's data every entry (caption or translation) belongs to a CC12M image and is trained with
it, so the default is 1 for every key; ``text_only_translations`` models JSONL translations
without images (mixed batches). Sources:

- ``official``: the official repository's ``data/tok_counts.json`` (CC12M captions and CCMatrix
  translations of the paper's pretraining data): total / max prompt and output tokens and
  sample counts per task and language, the numbers below;
- a dataset manifest (``tools/preprocess_data.py`` writes the same ``tok_counts`` layout);
- per-key means given on the command line (``caption-en=17/58,translation-de=60/55``).

Only means and maxima are published, so lengths are drawn from a log-normal around the mean
(``sigma`` 0.5 by default, a usual fit of sentence lengths; the template-only caption prompts
use a narrow 0.1), clipped to [2, max] and then cropped to the training lengths. The draw is
an assumption; the tables that use it say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmcap.data.prompts import ALL_KEYS

__all__ = ["OFFICIAL_TOK_COUNTS", "KeyLengths", "LengthModel"]

# github.com/spravil/caption-via-translation data/tok_counts.json (read 2026-11-30).
OFFICIAL_TOK_COUNTS = {
    "total_prompt_count": {
        "caption": {"de": 212176888, "en": 322384003},
        "translation": {
            "de": 1960254558, "es": 901121552, "zh": 747386766, "ru": 786632490, "fr": 832723026,
        },
    },
    "max_prompt_count": {
        "caption": {"de": 20, "en": 20},
        "translation": {"de": 8162, "es": 462, "zh": 457, "ru": 442, "fr": 441},
    },
    "total_output_count": {
        "caption": {"de": 788344516, "en": 1131552520},
        "translation": {
            "de": 1809689672, "es": 762664515, "zh": 543939630, "ru": 732363716, "fr": 752542533,
        },
    },
    "max_output_count": {
        "caption": {"de": 913, "en": 12271},
        "translation": {"de": 913, "es": 463, "zh": 629, "ru": 580, "fr": 530},
    },
    "sample_count": {
        "caption": {"de": 12927044, "en": 19431960},
        "translation": {
            "de": 32848032, "es": 19102755, "zh": 16778439, "ru": 17761632, "fr": 18532141,
        },
    },
}


@dataclass(frozen=True)
class KeyLengths:
    prompt_mean: float
    target_mean: float
    prompt_max: int = 1024
    target_max: int = 1024
    image_fraction: float = 1.0


@dataclass
class LengthModel:
    """Args:
    keys: key name (``caption-en``, ``translation-de``, ...) -> its lengths.
    sigma: log-normal spread of the drawn lengths (0 = every sample at the mean).
    source: where the numbers come from (for reports).
    """

    keys: dict[str, KeyLengths]
    sigma: float = 0.5
    source: str = ""

    @classmethod
    def from_tok_counts(
        cls, tok: dict, source: str, sigma: float = 0.5, text_only_translations: bool = False
    ) -> LengthModel:
        """From the official ``tok_counts`` layout (task -> language -> number)."""
        keys = {}
        for task, langs in tok["sample_count"].items():
            for lang, n in langs.items():
                if not n:
                    continue
                keys[f"{task}-{lang}"] = KeyLengths(
                    tok["total_prompt_count"][task][lang] / n,
                    tok["total_output_count"][task][lang] / n,
                    int(tok["max_prompt_count"][task][lang]),
                    int(tok["max_output_count"][task][lang]),
                    image_fraction=0.0 if text_only_translations and task != "caption" else 1.0,
                )
        return cls(keys, sigma, source)

    @classmethod
    def official(cls, sigma: float = 0.5, text_only_translations: bool = False) -> LengthModel:
        return cls.from_tok_counts(
            OFFICIAL_TOK_COUNTS, "official tok_counts.json", sigma, text_only_translations
        )

    @classmethod
    def from_manifest(
        cls, path: str | Path, sigma: float = 0.5, text_only_translations: bool = False
    ) -> LengthModel:
        """From a preprocessed dataset's ``manifest.json`` (or its directory): its
        ``token_stats`` (the official ``tok_counts`` layout)."""
        p = Path(path)
        p = p / "manifest.json" if p.is_dir() else p
        try:
            m = json.loads(p.read_text())
            tok = m.get("token_stats") or m["tok_counts"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{p}: no readable token_stats in the dataset manifest ({e})") from None
        return cls.from_tok_counts(tok, str(p), sigma, text_only_translations)

    @classmethod
    def from_means(cls, spec: str, sigma: float = 0.5) -> LengthModel:
        """``"caption-en=17/58,translation-de=60/55"``: prompt / target mean per key."""
        keys = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                key, means = item.split("=")
                p, t = (float(x) for x in means.split("/"))
            except ValueError:
                raise ValueError(
                    f"length spec {item!r}: expected KEY=PROMPT_MEAN/TARGET_MEAN"
                ) from None
            if key not in ALL_KEYS:
                raise ValueError(f"length spec {item!r}: unknown key {key!r}; keys: {ALL_KEYS}")
            keys[key] = KeyLengths(p, t)
        if not keys:
            raise ValueError("empty length spec")
        return cls(keys, sigma, "per-key means")

    def _draw(self, rng, mean: float, cap: int, n: int, sigma: float) -> np.ndarray:
        if sigma <= 0 or n == 0:
            x = np.full(n, mean)
        else:  # log-normal with the given mean: mu = log(mean) - sigma^2 / 2
            x = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, n)
        return np.clip(np.rint(x), 2, max(cap, 2)).astype(np.int64)

    def sample(
        self, n: int, *, seed: int = 0, weights: dict[str, float] | None = None,
        max_prompt: int = 128, max_target: int = 128,
    ) -> dict[str, np.ndarray]:
        """``n`` samples: keys drawn in proportion to ``weights`` (default uniform over the
        model's keys = task-language balancing), lengths cropped to the training lengths.

        Returns dict of arrays: ``key`` (names), ``prompt``, ``target``, ``has_image``.
        """
        rng = np.random.default_rng(seed)
        names = sorted(self.keys)
        w = np.array([(weights or {}).get(k, 1.0 if weights is None else 0.0) for k in names])
        if w.sum() <= 0:
            raise ValueError(f"weights select none of the keys {names}")
        counts = np.floor(w / w.sum() * n).astype(int)
        counts[np.argsort(-w)[: n - counts.sum()]] += 1  # exact balance, rest to the heaviest
        key, prompt, target, image = [], [], [], []
        for name, c in zip(names, counts):
            k = self.keys[name]
            sig_p = 0.1 if (name.startswith("caption") and self.sigma > 0) else self.sigma
            key += [name] * c
            prompt.append(self._draw(rng, k.prompt_mean, k.prompt_max, c, sig_p))
            target.append(self._draw(rng, k.target_mean, k.target_max, c, self.sigma))
            image.append(rng.random(c) < k.image_fraction)
        order = rng.permutation(n)
        return {
            "key": np.asarray(key)[order],
            "prompt": np.minimum(np.concatenate(prompt), max_prompt)[order],
            "target": np.minimum(np.concatenate(target), max_target)[order],
            "has_image": np.concatenate(image).astype(bool)[order],
        }
