"""Run a downstream task set: read each dataset, generate (or score) with a model, cache the
predictions per task, compute the metrics, write ``eval_results.json`` and
``eval_results.md`` (both atomic, rewritten after every task).

Bad inputs never stop a long run halfway:

- a dataset whose annotation files are absent: the task is skipped, named with the missing
  file under ``"skipped_tasks"`` (counted in the log); a task named explicitly in ``--tasks``
  (not through a set) makes it an error instead. Malformed annotations are always errors
  (file, line, field).
- an image that does not decode (or does not exist): the sample is skipped, counted
  (``"skipped_images"``) and named (``"skipped_image_files"``, first 20 and the log).
- an empty prediction is scored as an empty string and counted (``"empty_predictions"``).

Prediction caches (``preds_*.json``, official names, in ``out``) are rewritten after every
batch, so an interrupted run resumes at the last finished batch; a cache made with other
generation settings (checkpoint, prefix, beams, ...) is an error naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mmcap.eval.downstream.datasets import DatasetMissingError, Sample
from mmcap.eval.downstream.scoring import score_task
from mmcap.eval.downstream.tasks import Task, select_tasks
from mmcap.eval.downstream_metrics import ambiguity_accuracy

log = logging.getLogger(__name__)

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"
TABLE_METRICS = (
    "SacreBLEU",
    "COMET",
    "METEOR",
    "BLEU_4",
    "CIDEr",
    "cocoMETEOR",
    "XM3600_CIDEr",
    "accuracy",
)


@dataclass
class DownstreamOptions:
    """Args:
    data_root: the official eval datasets root (``multi30k/``, ``xm3600/``, ``CoMMuTE/``,
        ``coco/``).
    out: output directory (results, markdown table, prediction caches).
    tasks: comma-separated set / task names (:mod:`mmcap.eval.downstream.tasks`).
    batch_size: samples per generation / scoring batch.
    official_multi30k_bleu: report the official Multi30K captioning SacreBLEU (first five
        hypotheses only) as ``SacreBLEU`` instead of the per-image reference streams.
    meteor: pycocoevalcap METEOR on captioning (needs Java; ~40 s JVM start per task here).
    comet_model: local COMET checkpoint (``.../checkpoints/model.ckpt``); COMET needs
        ``unbabel-comet`` too.
    limit: evaluate only the first ``limit`` samples of each task (smoke runs; None = all).
    meteor_jar: the official METEOR 1.5 jar (with its ``data/``) for the official ``METEOR``
        of translation and Multi30K captioning; None = skipped with a message.
    """

    data_root: Path
    out: Path
    tasks: str = "full"
    batch_size: int = 8
    official_multi30k_bleu: bool = False
    meteor: bool = True
    comet_model: str | None = None
    limit: int | None = None
    meteor_jar: str | None = None

    def __post_init__(self) -> None:
        self.data_root, self.out = Path(self.data_root), Path(self.out)
        if not self.data_root.is_dir():
            raise FileNotFoundError(f"--data-root {self.data_root} is not a directory")
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.comet_model is not None and not Path(self.comet_model).exists():
            raise FileNotFoundError(f"--comet-model {self.comet_model} does not exist")
        if self.meteor_jar is not None and not Path(self.meteor_jar).is_file():
            raise FileNotFoundError(f"--meteor-jar {self.meteor_jar} does not exist")
        select_tasks(self.tasks)  # unknown names fail here


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cache(path: Path, task: Task, settings: dict, ids: list[str]) -> dict:
    empty = {
        "task": task.name,
        "settings": settings,
        "ids": [],
        "predictions": [],
        "ce_correct": [],
        "ce_incorrect": [],
    }
    if not path.is_file():
        return empty
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
        got_settings, got_ids = cache["settings"], cache["ids"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"prediction cache {path}: unreadable ({e!r}); delete it to regenerate")
    if got_settings != settings:
        diff = {
            k: (got_settings.get(k), v) for k, v in settings.items() if got_settings.get(k) != v
        }
        raise ValueError(
            f"prediction cache {path} was made with other settings {diff} (cached, now); "
            "use another --out or delete the file"
        )
    n = min(len(got_ids), len(ids))  # a cache of a longer run (--limit) serves a shorter one
    if got_ids[:n] != ids[:n]:
        raise ValueError(f"prediction cache {path}: its samples are not this dataset's; delete it")
    return {**empty, **cache}


def _predict(
    task: Task, samples: list[Sample], model, opts: DownstreamOptions, settings: dict
) -> dict:
    """Predictions (or CE pairs) of every sample, from the cache where present."""
    path = opts.out / task.cache_name
    ids = [s.id for s in samples]
    cache = _load_cache(path, task, settings, ids)
    done = len(cache["ids"])
    if done:
        log.info("%s: %d/%d samples from %s", task.name, min(done, len(ids)), len(ids), path)
    for start in range(done, len(samples), opts.batch_size):
        batch = samples[start : start + opts.batch_size]
        images = [str(s.image) for s in batch]
        if task.kind == "caption":
            cache["predictions"] += model.caption(images, task.lang)
        elif task.kind == "translation":
            cache["predictions"] += model.translate([s.source for s in batch], images, task.lang)
        else:
            srcs = [s.source for s in batch]
            good = model.sentence_scores(srcs, images, task.lang, [s.references[0] for s in batch])
            bad = model.sentence_scores(srcs, images, task.lang, [s.incorrect for s in batch])
            cache["ce_correct"] += [float(x) for x in good]
            cache["ce_incorrect"] += [float(x) for x in bad]
        cache["ids"] += [s.id for s in batch]
        cache["complete"] = len(cache["ids"]) >= len(samples)
        write_json_atomic(path, cache)
        log.info("%s: %d/%d", task.name, len(cache["ids"]), len(samples))
    n = len(samples)
    return {k: (v[:n] if isinstance(v, list) else v) for k, v in cache.items()}


def _usable(samples: list[Sample], model) -> tuple[list[Sample], list[str]]:
    ok, bad = [], []
    for s in samples:
        why = model.image_error(s.image)
        if why is None:
            ok.append(s)
        else:
            bad.append(str(s.image))
            log.warning("skipping sample %s: %s", s.id, why)
    return ok, bad


def evaluate_task(task: Task, model, opts: DownstreamOptions, settings: dict) -> dict:
    """Metrics of one task (raises DatasetMissingError when its dataset is absent)."""
    samples = task.reader(opts.data_root)
    if opts.limit is not None:
        samples = samples[: opts.limit]
    samples, bad = _usable(samples, model)
    head = {"task": task.name, "samples": len(samples), "skipped_images": len(bad)}
    if bad:
        head["skipped_image_files"] = bad[:20]
    if not samples:
        raise _NoSamples(f"no decodable images ({len(bad)} skipped, first: {bad[0]})")
    got = _predict(task, samples, model, opts, settings)
    if task.kind == "ambiguity":
        acc = ambiguity_accuracy(torch.tensor(got["ce_correct"]), torch.tensor(got["ce_incorrect"]))
        return {**head, "accuracy": acc}
    preds = got["predictions"]
    empty = sum(1 for p in preds if not p.strip())
    metrics = score_task(
        task.metric,
        task.lang,
        preds,
        [list(s.references) for s in samples],
        [s.source for s in samples],
        official_multi30k_bleu=opts.official_multi30k_bleu,
        meteor=opts.meteor,
        comet_model=opts.comet_model,
        meteor_jar=opts.meteor_jar,
    )
    return {**head, "empty_predictions": empty, **metrics}


class _NoSamples(RuntimeError):
    pass


def markdown_table(results: list[dict], skipped: dict[str, str]) -> str:
    cols = [m for m in TABLE_METRICS if any(m in r for r in results)]
    lines = [
        "| task | samples | " + " | ".join(cols) + " | skipped images | empty preds |",
        "|---|---:|" + "---:|" * len(cols) + "---:|---:|",
    ]
    for r in results:
        vals = [f"{r[m]:.2f}" if m in r else "-" for m in cols]
        lines.append(
            f"| {r['task']} | {r['samples']} | "
            + " | ".join(vals)
            + f" | {r['skipped_images']} | {r.get('empty_predictions', '-')} |"
        )
    if skipped:
        lines += ["", f"Skipped tasks ({len(skipped)}):", ""]
        lines += [f"- {name}: {why}" for name, why in skipped.items()]
    return "\n".join(lines) + "\n"


def run_downstream(model, opts: DownstreamOptions, settings: dict) -> dict:
    """Evaluate every task of ``opts.tasks``; returns (and writes) the results object
    ``{"results": [per-task metrics], "skipped_tasks": {name: why}, "meta": {...}}``."""
    tasks, explicit = select_tasks(opts.tasks)
    results: list[dict] = []
    skipped: dict[str, str] = {}
    meta = {
        **settings,
        "data_root": str(opts.data_root.resolve()),
        "tasks": opts.tasks,
        "official_multi30k_bleu": opts.official_multi30k_bleu,
        "limit": opts.limit,
    }
    out = {"results": results, "skipped_tasks": skipped, "meta": meta}
    opts.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for task in tasks:
        t = time.perf_counter()
        try:
            metrics = evaluate_task(task, model, opts, settings)
        except DatasetMissingError as e:
            if task.name in explicit:
                raise
            skipped[task.name] = str(e)
            log.warning("skipping task %s (%d skipped so far): %s", task.name, len(skipped), e)
            continue
        except _NoSamples as e:
            skipped[task.name] = str(e)
            log.warning("skipping task %s: %s", task.name, e)
            continue
        metrics["seconds"] = round(time.perf_counter() - t, 2)
        results.append(metrics)
        meta["seconds"] = round(time.perf_counter() - t0, 2)
        write_json_atomic(opts.out / RESULTS_JSON, out)
        write_text_atomic(opts.out / RESULTS_MD, markdown_table(results, skipped))
    meta["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(opts.out / RESULTS_JSON, out)
    write_text_atomic(opts.out / RESULTS_MD, markdown_table(results, skipped))
    if skipped:
        log.warning("%d of %d tasks skipped: %s", len(skipped), len(tasks), ", ".join(skipped))
    return out
