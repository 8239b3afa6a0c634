"""A byte-based progress bar fed by a shared counter (workers add bytes they consumed).

Uses tqdm when installed (it comes with transformers / huggingface_hub), else prints a line
every few seconds to stderr.
"""

from __future__ import annotations

import sys
import time
from typing import Self


class Progress:
    """Context manager; set ``counter`` (anything with ``.value``) and call :meth:`poll`.

    Args:
        total: bytes of all inputs. done: bytes already done (resumed shards).
        enabled: False = silent.
    """

    def __init__(self, total: int, done: int = 0, enabled: bool = True):
        self.total, self.done, self.enabled = total, done, enabled
        self.counter = None
        self._bar = None
        self._last_print = 0.0
        self._shown = 0

    def __enter__(self) -> Self:
        if self.enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=self.total,
                    initial=self.done,
                    unit="B",
                    unit_scale=True,
                    desc="preprocess",
                    dynamic_ncols=True,
                )
            except ImportError:
                self._bar = None
        self._shown = self.done
        return self

    def poll(self) -> None:
        if not self.enabled or self.counter is None:
            return
        now = min(self.total, self.done + int(self.counter.value))
        if self._bar is not None:
            self._bar.update(now - self._shown)
        elif time.time() - self._last_print > 5 or now == self.total:
            pct = 100.0 * now / max(1, self.total)
            print(
                f"preprocess: {now / 1e6:.1f} / {self.total / 1e6:.1f} MB ({pct:.0f}%)",
                file=sys.stderr,
            )
            self._last_print = time.time()
        self._shown = now

    def __exit__(self, *exc) -> bool:
        if self.enabled:
            self.poll()
            if self._bar is not None:
                self._bar.close()
        return False
