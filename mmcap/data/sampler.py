"""Task-language balanced sampling over blended datasets, sharded over data-parallel ranks.

The sampler produces one deterministic *global* stream of samples from ``seed``; every
data-parallel rank computes the whole stream (cheap: no data is read) and keeps its contiguous
slice of each global batch, so the balancing counters are global and identical on all ranks.
For global sample ``n``:

1. **Blend**: the dataset whose share is most below its weight,
   ``argmax_d w_d * (n + 1) - taken_d`` (megatron-core's BlendedDataset rule; no randomness).
2. **Group**: the next sampling group (an image with all its entries, or one image-less
   entry) of that dataset's current epoch, a seeded permutation of its groups.
3. **Entry** (paper's task-language balancing): among the group's entries whose key has a
   target share, the one whose key is most under target, ``argmax_k t_k * (N + 1) - c_k``
   with ``N`` balanced samples so far; ties broken by a hash of (seed, n). A group with no
   such entry is skipped. (The official loader draws uniformly among the entries whose key
   is at or under target; the greedy rule tracks the target at least as tightly.)

``state_dict()`` holds a handful of integers per dataset and key; a sampler restored from it
yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmcap.data.config import SamplerConfig
from mmcap.data.prompts import ALL_KEYS

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a stateless hash for tie-breaking."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class GroupIndex:
    """What sampling needs of a dataset: entry keys and the entries of each group.

    Args:
        keys: key id (into prompts.ALL_KEYS) of every entry.
        group_offsets: entries of group g are ``order[offsets[g]:offsets[g + 1]]``.
        group_order: entry rows sorted by group, or None when entries are stored grouped.
        fingerprint: identifies the dataset in sampler states.
    """

    keys: np.ndarray
    group_offsets: np.ndarray
    group_order: np.ndarray | None = None
    fingerprint: str = ""

    @classmethod
    def from_dataset(cls, ds) -> GroupIndex:
        """From a :class:`mmcap.data.indexed.CaptionDataset`."""
        return cls(np.asarray(ds.entries["key"]), ds.group_offsets, ds.group_order, ds.fingerprint)

    @property
    def num_groups(self) -> int:
        return len(self.group_offsets) - 1

    def rows(self, g: int) -> np.ndarray:
        lo, hi = int(self.group_offsets[g]), int(self.group_offsets[g + 1])
        return np.arange(lo, hi) if self.group_order is None else self.group_order[lo:hi]


@dataclass
class GlobalBatch:
    """This rank's slice of one global batch.

    Args:
        step: index of the global batch (0-based).
        dataset / entry / key: per local sample, dataset index, entry row and key id.
        sample: global sample index of each local sample.
        state: sampler state after this batch (save it with the checkpoint of the step that
            consumed this batch; restoring it resumes right after).
    """

    step: int
    dataset: np.ndarray
    entry: np.ndarray
    key: np.ndarray
    sample: np.ndarray
    state: dict


class TaskLangSampler:
    """Infinite iterator of :class:`GlobalBatch` (see module docstring).

    Args:
        datasets: one :class:`GroupIndex` per dataset (blend order = weight order).
        cfg: balancing target, dataset weights, batch size, data-parallel layout, seed.
    """

    def __init__(self, datasets: list[GroupIndex], cfg: SamplerConfig):
        if not datasets:
            raise ValueError("TaskLangSampler needs at least one dataset")
        self.datasets, self.cfg = datasets, cfg
        targets = cfg.target_weights()
        self.key_names = [k for k in ALL_KEYS if k in targets]
        self.target = np.zeros(len(ALL_KEYS))
        for k, w in targets.items():
            self.target[ALL_KEYS.index(k)] = w
        weights = cfg.dataset_weights or (1.0,) * len(datasets)
        if len(weights) != len(datasets):
            raise ValueError(
                f"SamplerConfig.dataset_weights has {len(weights)} values for "
                f"{len(datasets)} datasets; give one weight per dataset"
            )
        self.weights = np.asarray(weights, float) / float(sum(weights))
        # Python lists on the per-sample path (small; faster than numpy scalars).
        self._target = self.target.tolist()
        self._keys = [ds.keys.tolist() if len(ds.keys) < 1 << 22 else ds.keys for ds in datasets]
        for d, ds in enumerate(datasets):
            present = np.bincount(np.asarray(ds.keys), minlength=len(ALL_KEYS)) > 0
            if self.weights[d] > 0 and not np.any(present & (self.target > 0)):
                raise ValueError(
                    f"dataset {d} has no entry with a key of the balancing target "
                    f"{self.key_names}; drop it or give it weight 0"
                )
        self._perm: dict[int, tuple[int, np.ndarray]] = {}
        self.reset()

    def reset(self) -> None:
        n_ds = len(self.datasets)
        self.samples = 0  # global samples produced
        self.skipped = 0  # groups skipped for lack of an eligible entry
        self.key_counts = [0] * len(ALL_KEYS)
        self.taken = [0] * n_ds
        self.epoch = [0] * n_ds
        self.position = [0] * n_ds

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "seed": self.cfg.seed,
            "target": self._target,
            "weights": self.weights.tolist(),
            "fingerprints": [ds.fingerprint for ds in self.datasets],
            "num_groups": [ds.num_groups for ds in self.datasets],
            "samples": self.samples,
            "skipped": self.skipped,
            "key_counts": list(self.key_counts),
            "taken": list(self.taken),
            "epoch": list(self.epoch),
            "position": list(self.position),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for field in ("version", "seed", "target", "weights", "fingerprints", "num_groups"):
            if state.get(field) != mine[field]:
                raise ValueError(
                    f"sampler state does not match this sampler: {field} is "
                    f"{state.get(field)!r} in the state, {mine[field]!r} here "
                    "(resume with the same datasets, seed and balancing)"
                )
        self.samples, self.skipped = int(state["samples"]), int(state["skipped"])
        self.key_counts = [int(x) for x in state["key_counts"]]
        for field in ("taken", "epoch", "position"):
            setattr(self, field, [int(x) for x in state[field]])

    # -- sampling ------------------------------------------------------------------------
    def _permutation(self, d: int) -> np.ndarray:
        e = self.epoch[d]
        cached = self._perm.get(d)
        if cached is None or cached[0] != e:
            rng = np.random.default_rng([self.cfg.seed, d, e])
            cached = (e, rng.permutation(self.datasets[d].num_groups))
            self._perm[d] = cached
        return cached[1]

    def _next_group(self, d: int) -> int:
        perm = self._permutation(d)
        g = int(perm[self.position[d]])
        self.position[d] += 1
        if self.position[d] == len(perm):
            self.epoch[d], self.position[d] = self.epoch[d] + 1, 0
        return g

    def _pick_dataset(self) -> int:
        if len(self.datasets) == 1:
            return 0
        n1 = self.samples + 1
        return int(np.argmax(self.weights * n1 - np.asarray(self.taken)))

    def _pick_entry(self, d: int, g: int) -> int:
        """Row of the entry of group g whose key is most under target, or -1."""
        rows = self.datasets[d].rows(g)
        keys = self._keys[d]
        n1 = sum(self.key_counts) + 1
        best, best_rows = None, []
        for r in rows.tolist():
            k = keys[r]
            t = self._target[k]
            if t <= 0.0:
                continue
            deficit = t * n1 - self.key_counts[k]
            if best is None or deficit > best + 1e-9:
                best, best_rows = deficit, [r]
            elif deficit > best - 1e-9:
                best_rows.append(r)
        if not best_rows:
            return -1
        if len(best_rows) == 1:
            return best_rows[0]
        h = _mix64((self.cfg.seed & _MASK64) ^ _mix64(self.samples))
        return best_rows[h % len(best_rows)]

    def next_sample(self) -> tuple[int, int, int]:
        """(dataset, entry row, key id) of the next global sample."""
        d = self._pick_dataset()
        while True:
            row = self._pick_entry(d, self._next_group(d))
            if row >= 0:
                break
            self.skipped += 1
        k = int(self._keys[d][row])
        self.key_counts[k] += 1
        self.taken[d] += 1
        self.samples += 1
        return d, row, k

    def next_batch(self) -> GlobalBatch:
        """Advance by one global batch; return this rank's slice."""
        gb, dp = self.cfg.global_batch_size, self.cfg.data_parallel_size
        mb = gb // dp
        step = self.samples // gb
        if self.samples % gb:
            raise RuntimeError("sampler is mid-batch; use next_batch() only (or next_sample())")
        lo = self.cfg.data_parallel_rank * mb
        out = np.empty((3, mb), dtype=np.int64)
        for i in range(gb):
            s = self.next_sample()
            if lo <= i < lo + mb:
                out[:, i - lo] = s
        sample = np.arange(step * gb + lo, step * gb + lo + mb)
        return GlobalBatch(step, out[0], out[1], out[2], sample, self.state_dict())

    def __iter__(self):
        while True:
            yield self.next_batch()

    def key_shares(self) -> dict[str, float]:
        """Share of each target key among the samples so far."""
        total = max(1, sum(self.key_counts))
        return {k: self.key_counts[ALL_KEYS.index(k)] / total for k in self.key_names}
