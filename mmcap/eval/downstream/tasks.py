"""The official downstream tasks and task sets (src/eval.py ``--eval_task_set``).

A :class:`Task` names its dataset reader, its kind (what the model does: ``caption``,
``translation`` or ``ambiguity``), its target language and its metric family. Names and
prediction-cache file names are the official ones (``multi30k_translation_test_2016_flickr_de``
-> ``preds_translation_multi30k_task1_test_2016_flickr_de.json``), so results tables line up
with the paper's code.

Task sets: ``translation`` (Multi30K task 1 x 4 splits x de/fr, CoMMuTE de/fr/ru/zh),
``caption`` (Multi30K task 2 en/de, XM3600 x 6, COCO Karpathy test), ``ambiguity`` (CoMMuTE
x 4), ``full`` (the three, in that order, as official) and ``en_caption``. ``--tasks`` takes
set names and single task names, comma-separated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from mmcap.eval.downstream import datasets as ds

KINDS = ("caption", "translation", "ambiguity")
METRICS = ("translation", "coco_caption", "multi30k_caption", "xm3600", "ambiguity")


@dataclass(frozen=True)
class Task:
    """Args:
    name: official result name.
    kind: what the model does (``caption``, ``translation``, ``ambiguity``).
    lang: target language.
    metric: metric family (:data:`METRICS`): ``translation`` (SacreBLEU [+ COMET]),
        ``coco_caption`` (pycocoevalcap BLEU-4/CIDEr [+ METEOR]), ``multi30k_caption`` (those
        and SacreBLEU), ``xm3600`` (CIDEr on normalised tokens), ``ambiguity`` (accuracy).
    reader: ``reader(data_root) -> list[Sample]``.
    cache_name: prediction cache file (in ``--out``).
    """

    name: str
    kind: str
    lang: str
    metric: str
    reader: Callable
    cache_name: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in METRICS:
            raise ValueError(f"Task {self.name}: metric must be one of {METRICS}")


def _translation_tasks() -> list[Task]:
    out = [
        Task(
            f"multi30k_translation_{split}_{lang}",
            "translation",
            lang,
            "translation",
            partial(_call, ds.multi30k_task1, split=split, lang=lang),
            f"preds_translation_multi30k_task1_{split}_{lang}.json",
        )
        for split in ds.MULTI30K_TASK1_SPLITS
        for lang in ("de", "fr")
    ]
    out += [
        Task(
            f"commute_translation_{lang}",
            "translation",
            lang,
            "translation",
            partial(_call, ds.commute, lang=lang),
            f"preds_translation_commute_{lang}.json",
        )
        for lang in ds.COMMUTE_LANGS
    ]
    return out


def _multi30k_caption(lang: str) -> Task:
    return Task(
        f"multi30k_caption_test_2016_{lang}",
        "caption",
        lang,
        "multi30k_caption",
        partial(_call, ds.multi30k_task2, lang=lang),
        f"preds_caption_multi30k_task2_test_2016_{lang}.json",
    )


def _xm3600(lang: str) -> Task:
    return Task(
        f"xm3600_caption_{lang}",
        "caption",
        lang,
        "xm3600",
        partial(_call, ds.xm3600, lang=lang),
        f"preds_caption_xm3600_{lang}.json",
    )


def _coco() -> Task:
    return Task(
        "coco_karpathy_caption",
        "caption",
        "en",
        "coco_caption",
        partial(_call, ds.coco_karpathy, split="test"),
        "preds_caption_coco_karpathy_en.json",
    )


def _caption_tasks() -> list[Task]:
    return [
        *(_multi30k_caption(lang) for lang in ("en", "de")),
        *(_xm3600(lang) for lang in ds.XM3600_LANGS),
        _coco(),
    ]


def _ambiguity_tasks() -> list[Task]:
    return [
        Task(
            f"commute_lexical_ambiguity_{lang}",
            "ambiguity",
            lang,
            "ambiguity",
            partial(_call, ds.commute, lang=lang),
            f"preds_ambiguity_commute_{lang}.json",
        )
        for lang in ds.COMMUTE_LANGS
    ]


def _call(reader, root, **kwargs):
    return reader(root, **kwargs)


TASK_SETS: dict[str, list[Task]] = {
    "full": [*_translation_tasks(), *_caption_tasks(), *_ambiguity_tasks()],
    "caption": _caption_tasks(),
    "translation": _translation_tasks(),
    "ambiguity": _ambiguity_tasks(),
    "en_caption": [_multi30k_caption("en"), _xm3600("en"), _coco()],
}
ALL_TASKS: dict[str, Task] = {t.name: t for t in TASK_SETS["full"]}


def select_tasks(spec: str) -> tuple[list[Task], set[str]]:
    """Tasks of ``spec`` (comma-separated set and task names), in order, without repeats,
    and the names given explicitly (their missing datasets are errors, not skips)."""
    out: dict[str, Task] = {}
    explicit: set[str] = set()
    for part in (p.strip() for p in spec.split(",")):
        if part in TASK_SETS:
            out.update((t.name, t) for t in TASK_SETS[part] if t.name not in out)
        elif part in ALL_TASKS:
            out.setdefault(part, ALL_TASKS[part])
            explicit.add(part)
        else:
            raise ValueError(
                f"--tasks: unknown task or set {part!r}; sets: {', '.join(TASK_SETS)}; "
                f"tasks: {', '.join(ALL_TASKS)}"
            )
    return list(out.values()), explicit
