"""Periodic teacher-forced CE validation during training (:class:`Validator`): the code of
``tools/eval_loss.py`` (:func:`mmcap.eval.loss.evaluate_loss`) on the run's own model chunks."""

from __future__ import annotations

import time

from mmcap.train.config import TrainConfig


class Validator:
    """Args:
    cfg: the run's configuration (``eval`` section, ``data.valid``, ``data.batch`` crops).
    chunks: this rank's (DDP) model chunks (may be set after construction: the dataset is
        opened and checked before the model is built).
    """

    def __init__(self, cfg: TrainConfig, chunks=None):
        from mmcap.data.indexed import CaptionDataset

        self.interval = cfg.eval.interval
        self.enabled = bool(self.interval and cfg.data.valid)
        self.chunks = chunks
        self.cfg = cfg
        self.dataset = None
        if self.enabled:
            from mmcap.config import ConfigError
            from mmcap.data.compat import check_datasets_fit_model

            try:
                self.dataset = CaptionDataset(cfg.data.valid)
            except (OSError, ValueError) as e:
                raise ConfigError(f"data.valid: {e}") from None
            check_datasets_fit_model([self.dataset], cfg.model_config(), "data.valid")

    def due(self, step: int, last: bool = False) -> bool:
        """Validate after ``step``: every ``eval.interval`` steps, and after the last step."""
        return self.enabled and (step % self.interval == 0 or last)

    def __call__(self, step: int) -> dict[str, float]:
        """Collective: every rank calls it; returns ``eval/<split>`` and ``eval_key/<key>``
        CE, ``eval/samples`` and ``eval/time_s`` (the same on every rank)."""
        from mmcap.eval.loss import evaluate_loss

        n = len(self.dataset)
        rows = range(min(n, self.cfg.eval.max_samples or n))
        t0 = time.perf_counter()
        res = evaluate_loss(
            self.chunks,
            self.dataset,
            micro_batch_size=self.cfg.eval.micro_batch_size,
            rows=rows,
            batch_cfg=self.cfg.data.batch,
        )
        m = {f"eval/{k}": v["ce"] for k, v in res.splits.items() if v["ce"] is not None}
        m.update({f"eval_key/{k}": v["ce"] for k, v in res.keys.items() if v["ce"] is not None})
        m["eval/samples"] = len(rows)
        m["eval/time_s"] = time.perf_counter() - t0
        return m  # printed, labelled, by the logger (MetricsLogger.log_eval)
