"""Official webdataset tars / JSONL -> an indexed caption dataset (``tools/preprocess_data.py``).

Each input file is one unit of work, written by one process as a *shard* under
``{out}.partial/shards/NNNNNN`` (built in ``NNNNNN.tmp`` and renamed when complete). When all
shards exist they are concatenated (megatron-core's index format) into ``{out}.partial/merged``,
the manifest is written last, and that folder is renamed to ``out``. So:

- a killed run never leaves ``out`` (nothing there reads as a dataset until the rename);
- a restart with the same inputs, tokenizers and limits (``plan.json``) resumes from the
  finished shards; with anything different it discards the partial work and starts over;
- the two tokenizers are copied into ``{out}/tokenizers/`` (``encoder/``,
  ``decoder/tokenizer.model``), so checkpoints trained on the data can carry them;
- every skipped record or entry is counted per reason in the manifest and written, with its
  file, key or line, entry index and field, to ``rejects.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from mmcap.checkpoint.inference_assets import DATASET_TOKENIZERS, TokenizerFiles, write_files
from mmcap.data.config import PreprocessConfig
from mmcap.data.indexed import FORMAT, MANIFEST, TASK_TOKENS, ShardWriter, merge_shards
from mmcap.data.inputs import TAR_SUFFIXES, expand_inputs
from mmcap.data.manifest import DatasetStats, build_manifest, write_json_durable
from mmcap.data.prompts import KEY_IDS
from mmcap.data.records import (
    EntryError,
    Reject,
    check_jpeg,
    iter_jsonl,
    iter_tar,
    loads_truncated,
    parse_data_member,
    parse_jsonl_line,
    validate_entry,
)

log = logging.getLogger(__name__)


class _LocalCounter:
    """Stand-in for ``multiprocessing.Value`` when running in-process."""

    def __init__(self):
        self.value = 0

    def get_lock(self):
        return contextlib.nullcontext()


_WORKER: dict = {}  # per-process tokenizers and progress counter


def _init_worker(gemma: str, encoder: str, counter) -> None:
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(target=TargetTokenizer(gemma), prompt=PromptTokenizer(encoder), counter=counter)


class _ShardJob:
    """Turns one input file into one shard directory."""

    def __init__(self, index: int, path: Path, shard_dir: Path, cfg: PreprocessConfig):
        self.index, self.path, self.shard_dir, self.cfg = index, path, shard_dir, cfg
        self.stats = DatasetStats()
        self._progress_pos = 0

    def run(self) -> dict:
        tmp = self.shard_dir.with_name(self.shard_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.writer = ShardWriter(tmp, _WORKER["prompt"].vocab_size, source=self.index)
        with open(tmp / "rejects.jsonl", "w") as self.reject_log:
            if self.path.name.endswith(TAR_SUFFIXES):
                self._tar()
            else:
                self._jsonl()
        self.writer.finalize()
        write_json_durable(tmp / "stats.json", self.stats.to_json())
        shutil.rmtree(self.shard_dir, ignore_errors=True)  # a stray, unfinished one
        os.replace(tmp, self.shard_dir)
        self._progress(self.path.stat().st_size)
        return self.stats.to_json()

    def _progress(self, pos: int) -> None:
        delta, self._progress_pos = pos - self._progress_pos, max(pos, self._progress_pos)
        if delta > 0:
            with _WORKER["counter"].get_lock():
                _WORKER["counter"].value += delta

    def _reject(self, record: str, entry: int | None, err: EntryError | Reject) -> None:
        r = (
            err
            if isinstance(err, Reject)
            else Reject(str(self.path), record, entry, err.field, err.reason, err.message)
        )
        self.stats.add_reject(r.reason)
        self.reject_log.write(r.to_json() + "\n")

    def _tokenize(self, record: str, clean: list) -> list:
        """[(entry index, CleanEntry)] -> [(entry index, CleanEntry, prompt ids, target ids)];
        over-long entries are counted, and rejected unless ``long_entries="keep"``."""
        if not clean:
            return []
        p_ids = _WORKER["prompt"].encode([c.prompt_text for _, c in clean])
        t_ids = _WORKER["target"].encode([c.output for _, c in clean])
        out = []
        keep_long = self.cfg.long_entries == "keep"
        for (j, c), p, t in zip(clean, p_ids, t_ids):
            long = len(p) > self.cfg.max_prompt_tokens or len(t) > self.cfg.max_target_tokens
            self.stats.long_entries += long
            if keep_long or not long:
                out.append((j, c, p, t))
            elif len(p) > self.cfg.max_prompt_tokens:
                self._reject(
                    record,
                    j,
                    EntryError(
                        "too_long",
                        "prompt",
                        f"{len(p)} prompt tokens > {self.cfg.max_prompt_tokens}",
                    ),
                )
            elif len(t) > self.cfg.max_target_tokens:
                self._reject(
                    record,
                    j,
                    EntryError(
                        "too_long",
                        "output",
                        f"{len(t)} target tokens > {self.cfg.max_target_tokens}",
                    ),
                )
        return out

    def _check_image(self, jpg: bytes) -> str | None:
        """Why the JPEG is not kept, or None; a truncated one is counted, and kept when
        ``truncated_images="load"``."""
        err = check_jpeg(jpg, self.cfg.verify_images)
        if err and self.cfg.verify_images and loads_truncated(jpg):
            self.stats.truncated_images += 1
            if self.cfg.truncated_images == "load":
                return None
            err = f"truncated JPEG ({err}); truncated_images='load' keeps it"
        return err

    def _write(self, tokenized: list, record_id: str, record: int, image: int, group: int) -> None:
        for j, c, p, t in tokenized:
            self.writer.add_entry(
                p,
                t,
                record_id,
                key=KEY_IDS[c.key],
                task=TASK_TOKENS.index(c.task_token),
                group=group,
                image=image,
                record=record,
                entry=j,
            )
            self.stats.add_entry(c.key, len(p), len(t))

    def _tar(self) -> None:
        for item in iter_tar(str(self.path)):
            if isinstance(item, Reject):
                self._reject(item.record, None, item)
                continue
            self.stats.records_seen += 1
            try:
                entries = parse_data_member(item.members.get("data"), self.cfg.max_text_chars)
                jpg = item.members.get("jpg", item.members.get("jpeg"))
                if jpg is None:
                    raise EntryError("missing_field", "jpg", "no .jpg member")
                err = self._check_image(jpg)
                if err:
                    raise EntryError("bad_image", "jpg", err)
            except EntryError as e:
                self._reject(item.key, None, e)
                continue
            clean = []
            for j, raw in enumerate(entries):
                self.stats.entries_seen += 1
                try:
                    clean.append((j, validate_entry(raw, self.cfg.max_text_chars)))
                except EntryError as e:
                    self._reject(item.key, j, e)
            tokenized = self._tokenize(item.key, clean)
            if tokenized:
                self.stats.records_kept += 1
                self._write(
                    tokenized,
                    item.key,
                    item.ordinal,
                    self.writer.add_image(jpg),
                    self.writer.new_group(),
                )
            self._progress(item.offset)

    def _jsonl_image(self, name, images: dict) -> tuple[int, int]:
        """(image row, group) of an image path, stored once per file; raises EntryError."""
        if not isinstance(name, str):
            raise EntryError("missing_field", "image", f"image must be a path string, got {name!r}")
        path = Path(name) if os.path.isabs(name) else self.path.parent / name
        if path not in images:
            try:
                data = path.read_bytes()
                err = self._check_image(data)
            except OSError as e:
                err = f"cannot read {path}: {e.strerror or e}"
            images[path] = err or (self.writer.add_image(data), self.writer.new_group())
        got = images[path]
        if isinstance(got, str):
            raise EntryError("bad_image", "image", got)
        return got

    def _jsonl(self) -> None:
        images: dict[Path, tuple[int, int] | str] = {}
        for line_no, raw, pos in iter_jsonl(str(self.path)):
            self.stats.records_seen += 1
            self.stats.entries_seen += 1
            where = f"line {line_no}"
            try:
                obj = parse_jsonl_line(raw)
                clean = validate_entry(obj, self.cfg.max_text_chars)
                record_id = str(obj.get("id", line_no))
                tokenized = self._tokenize(where, [(0, clean)])
                if not tokenized:
                    continue
                if obj.get("image") not in (None, ""):
                    image, group = self._jsonl_image(obj["image"], images)
                elif clean.key.startswith("caption"):
                    raise EntryError("missing_field", "image", "a caption needs an image")
                else:
                    image, group = -1, self.writer.new_group()
            except EntryError as e:
                self._reject(where, None, e)
                continue
            self.stats.records_kept += 1
            self._write(tokenized, record_id, line_no, image, group)
            self._progress(pos)


def _run_job(args) -> dict:
    return _ShardJob(*args).run()


def _plan(sources: list[Path], target, prompt, cfg: PreprocessConfig) -> dict:
    return {
        "format": FORMAT,
        # mtime only decides whether finished shards may be reused; the manifest drops it.
        "sources": [
            {"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for p in sources
        ],
        "tokenizers": {"target": target.describe(), "prompt": prompt.describe()},
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"},
    }


def _prepare_partial(partial: Path, plan: dict) -> None:
    """Keep a partial run with the same plan (resume), else start it over."""
    plan_file = partial / "plan.json"
    if partial.exists():
        try:
            same = json.loads(plan_file.read_text()) == plan
        except (OSError, ValueError):
            same = False
        if same:
            log.info("resuming %s", partial)
        else:
            log.warning("%s holds a run with other inputs or settings; starting over", partial)
            shutil.rmtree(partial)
    (partial / "shards").mkdir(parents=True, exist_ok=True)
    for tmp in (partial / "shards").glob("*.tmp"):
        shutil.rmtree(tmp)
    shutil.rmtree(partial / "merged", ignore_errors=True)
    write_json_durable(plan_file, plan)


def preprocess(
    inputs: list[str],
    gemma_tokenizer: str,
    encoder_tokenizer: str,
    out: str,
    cfg: PreprocessConfig | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Build the dataset ``out`` from ``inputs`` (paths or globs); returns the manifest."""
    from mmcap.data.progress import Progress
    from mmcap.data.tokenizers import PromptTokenizer, TargetTokenizer

    cfg = cfg or PreprocessConfig()
    sources = expand_inputs(inputs)
    out_dir = Path(out).resolve()
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} is already a dataset; pass overwrite (--overwrite)")
    if out_dir.exists() and not (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} exists and is not an mmcap dataset; remove it first")
    target, prompt = TargetTokenizer(gemma_tokenizer), PromptTokenizer(encoder_tokenizer)
    plan = _plan(sources, target, prompt, cfg)
    partial = out_dir.with_name(out_dir.name + ".partial")
    _prepare_partial(partial, plan)
    shards = [partial / "shards" / f"{i:06d}" for i in range(len(sources))]
    todo = [i for i, s in enumerate(shards) if not (s / "stats.json").exists()]
    sizes = [s["size"] for s in plan["sources"]]
    done_bytes = sum(sizes) - sum(sizes[i] for i in todo)
    jobs = [(i, sources[i], shards[i], cfg) for i in todo]
    t0 = time.time()
    with Progress(sum(sizes), done_bytes, enabled=show_progress) as bar:
        if cfg.workers == 1 or len(jobs) <= 1:
            _init_worker(gemma_tokenizer, encoder_tokenizer, _LocalCounter())
            bar.counter = _WORKER["counter"]
            for job in jobs:
                _run_job(job)
                bar.poll()
        else:
            import multiprocessing as mp

            # Workers fork from a server that imported this module (megatron-core, transformers)
            # once; "fork" of this process is unsafe once torch threads exist. Entry points
            # need a main guard (the server re-imports __main__).
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["mmcap.data.preprocess", "mmcap.data.tokenizers"])
            counter = ctx.Value("q", 0)
            bar.counter = counter
            with ctx.Pool(
                min(cfg.workers, len(jobs)),
                initializer=_init_worker,
                initargs=(gemma_tokenizer, encoder_tokenizer, counter),
            ) as pool:
                pending = [pool.apply_async(_run_job, (job,)) for job in jobs]
                while not all(r.ready() for r in pending):
                    bar.poll()
                    time.sleep(0.2)
                for r in pending:
                    r.get()  # re-raises a worker's exception
    tokenizers = TokenizerFiles(Path(encoder_tokenizer), Path(gemma_tokenizer), "preprocess")
    return _finish(shards, partial, out_dir, plan, overwrite, time.time() - t0, tokenizers)


def _finish(
    shards,
    partial: Path,
    out_dir: Path,
    plan: dict,
    overwrite: bool,
    seconds: float,
    tokenizers: TokenizerFiles,
) -> dict:
    """Merge shards, write rejects + a copy of the tokenizers + manifest, rename into place."""
    merged = partial / "merged"
    counts = merge_shards(shards, merged)
    # The tokenizers travel with the data: training stores them in its checkpoints and the
    # Hugging Face export writes the processor from them (mmcap.checkpoint.inference_assets).
    write_files(merged, tokenizers.files(prefix=f"{DATASET_TOKENIZERS}/"))
    stats = DatasetStats()
    with open(merged / "rejects.jsonl", "w") as rej:
        for s in shards:
            stats.merge(DatasetStats.from_json(json.loads((s / "stats.json").read_text())))
            rej.write((s / "rejects.jsonl").read_text())
    manifest = build_manifest(
        fmt=FORMAT,
        sources=[{"path": s["path"], "size": s["size"]} for s in plan["sources"]],
        tokenizers=plan["tokenizers"],
        config=plan["config"],
        counts=counts,
        stats=stats,
        files_dir=merged,
    )
    write_json_durable(merged / MANIFEST, manifest)
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(merged, out_dir)
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename durable
    finally:
        os.close(fd)
    shutil.rmtree(partial)
    log.info(
        "wrote %s: %d entries, %d images, %d rejects in %.1f s",
        out_dir,
        counts["entries"],
        counts["images"],
        sum(stats.rejects.values()),
        seconds,
    )
    return manifest
