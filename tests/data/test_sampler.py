"""Task-language balancing, blending, data-parallel sharding and exact resume of the sampler."""

import json

import numpy as np
import pytest

from mmcap.config import ConfigError
from mmcap.data.config import SamplerConfig
from mmcap.data.prompts import ALL_KEYS, FINETUNING_KEYS, KEY_IDS, PRETRAINING_KEYS
from mmcap.data.sampler import GroupIndex, TaskLangSampler


def _index(seed, n_groups, availability: dict[str, float], fingerprint="") -> GroupIndex:
    """Groups whose entries have key k with probability availability[k] (at least one entry;
    a key may appear twice, like short and detailed captions)."""
    rng = np.random.default_rng(seed)
    keys, offsets = [], [0]
    names = list(availability)
    for _ in range(n_groups):
        group = [KEY_IDS[k] for k in names if rng.random() < availability[k]]
        group = group or [KEY_IDS[names[rng.integers(len(names))]]]
        if rng.random() < 0.3:
            group.append(group[0])
        keys += group
        offsets.append(len(keys))
    return GroupIndex(np.array(keys, np.uint8), np.array(offsets, np.int64), None, fingerprint)


# Skewed like the real data: captions on most images, some translations rare.
PRETRAIN_AVAIL = {
    "caption-en": 0.9,
    "caption-de": 0.6,
    "translation-de": 0.5,
    "translation-fr": 0.3,
    "translation-es": 0.3,
    "translation-zh": 0.2,
    "translation-ru": 0.25,
    "caption-fr": 0.5,
}  # not a pretraining key: must never be drawn


def _naive_shares(index: GroupIndex, keys, n, seed=0):
    """Uniform choice among a group's target-key entries (no balancing), for contrast."""
    rng = np.random.default_rng(seed)
    ids = [KEY_IDS[k] for k in keys]
    counts = dict.fromkeys(ids, 0)
    for g in rng.integers(0, index.num_groups, n):
        ks = [k for k in index.keys[index.rows(g)].tolist() if k in counts]
        if ks:
            counts[ks[rng.integers(len(ks))]] += 1
    total = sum(counts.values())
    return {ALL_KEYS[k]: c / total for k, c in counts.items()}


@pytest.mark.parametrize(
    "balancing, keys, avail",
    [
        ("task-lang-balancing", PRETRAINING_KEYS, PRETRAIN_AVAIL),
        (
            "generalist-finetune",
            FINETUNING_KEYS,
            {k: 0.15 + 0.07 * i for i, k in enumerate(FINETUNING_KEYS)},
        ),
    ],
)
def test_balance_within_one_percent_over_10k(balancing, keys, avail):
    index = _index(0, 3000, avail)
    naive = _naive_shares(index, keys, 10_000)
    target = 1.0 / len(keys)
    assert max(abs(s / target - 1) for s in naive.values()) > 0.2  # the data is skewed
    sampler = TaskLangSampler([index], SamplerConfig(balancing=balancing, global_batch_size=100))
    drawn = np.concatenate([sampler.next_batch().key for _ in range(100)])
    assert len(drawn) == 10_000
    counts = np.bincount(drawn, minlength=len(ALL_KEYS))
    assert set(np.nonzero(counts)[0].tolist()) == {KEY_IDS[k] for k in keys}
    for k in keys:
        share = counts[KEY_IDS[k]] / len(drawn)
        assert abs(share / target - 1) < 0.01, (k, share, target)


def test_custom_target_weights():
    index = _index(1, 2000, PRETRAIN_AVAIL)
    target = {"caption-en": 3.0, "caption-de": 1.0, "translation-zh": 1.0}
    sampler = TaskLangSampler(
        [index], SamplerConfig(balancing="custom", target=target, global_batch_size=50)
    )
    for _ in range(100):
        sampler.next_batch()
    shares = sampler.key_shares()
    for k, w in target.items():
        assert abs(shares[k] / (w / 5.0) - 1) < 0.01


# Official train.py get_balancing_data, written out as shares (not derived from our table).
OFFICIAL_SHARES = {
    "task-balancing": {"caption-en": 5, "caption-de": 5, **{
        f"translation-{x}": 2 for x in ("de", "fr", "es", "zh", "ru")}},
    "lang-balancing": {"caption-en": 2, "caption-de": 1, "translation-de": 1, **{
        f"translation-{x}": 2 for x in ("fr", "es", "zh", "ru")}},
}


@pytest.mark.parametrize("balancing", sorted(OFFICIAL_SHARES))
def test_official_presets_reach_their_shares(balancing):
    want = {k: w / sum(OFFICIAL_SHARES[balancing].values())
            for k, w in OFFICIAL_SHARES[balancing].items()}
    assert SamplerConfig(balancing=balancing).target_weights() == pytest.approx(want)
    sampler = TaskLangSampler(
        [_index(4, 3000, PRETRAIN_AVAIL)], SamplerConfig(balancing=balancing, global_batch_size=100)
    )
    for _ in range(100):
        sampler.next_batch()
    shares = sampler.key_shares()
    assert set(shares) == set(want)
    for k, w in want.items():
        assert abs(shares[k] / w - 1) < 0.01, (k, shares[k], w)


def test_blending_follows_weights_exactly():
    a, b = _index(2, 500, PRETRAIN_AVAIL, "a"), _index(3, 80, PRETRAIN_AVAIL, "b")
    sampler = TaskLangSampler(
        [a, b], SamplerConfig(dataset_weights=(0.7, 0.3), global_batch_size=100)
    )
    ds = np.concatenate([sampler.next_batch().dataset for _ in range(50)])
    assert abs((ds == 0).sum() - 3500) <= 1 and abs((ds == 1).sum() - 1500) <= 1
    assert sampler.epoch[1] >= 18  # the small dataset wrapped around many times


def test_each_group_once_per_epoch():
    index = _index(4, 257, {k: 1.0 for k in PRETRAINING_KEYS})  # every group eligible
    sampler = TaskLangSampler([index], SamplerConfig(global_batch_size=1))
    for epoch in range(3):
        groups = []
        for _ in range(257):
            _, row, _ = sampler.next_sample()
            groups.append(int(np.searchsorted(index.group_offsets, row, side="right") - 1))
        assert sorted(groups) == list(range(257)), epoch


def test_data_parallel_slices_partition_the_global_batch():
    index = _index(5, 400, PRETRAIN_AVAIL)
    full = TaskLangSampler([index], SamplerConfig(global_batch_size=64))
    ranks = [
        TaskLangSampler(
            [index], SamplerConfig(global_batch_size=64, data_parallel_size=4, data_parallel_rank=r)
        )
        for r in range(4)
    ]
    for _ in range(5):
        g = full.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert all(p.step == g.step for p in parts)
        np.testing.assert_array_equal(np.concatenate([p.entry for p in parts]), g.entry)
        np.testing.assert_array_equal(np.concatenate([p.sample for p in parts]), g.sample)
        assert all(p.state == g.state for p in parts)  # one global state on every rank


def _ids(batches):
    return [(b.step, b.dataset.tolist(), b.entry.tolist()) for b in batches]


def test_resume_sees_exactly_the_uninterrupted_samples():
    idx = [_index(6, 90, PRETRAIN_AVAIL, "x"), _index(7, 40, PRETRAIN_AVAIL, "y")]
    cfg = SamplerConfig(
        dataset_weights=(2.0, 1.0),
        global_batch_size=32,
        data_parallel_size=2,
        data_parallel_rank=1,
        seed=7,
    )
    uninterrupted = TaskLangSampler(idx, cfg)
    reference = _ids(uninterrupted.next_batch() for _ in range(40))
    first = TaskLangSampler(idx, cfg)
    before = [first.next_batch() for _ in range(17)]
    state = json.loads(json.dumps(before[-1].state))  # through a checkpoint (JSON-safe)
    assert state == first.state_dict()
    resumed = TaskLangSampler(idx, cfg)
    resumed.load_state_dict(state)
    after = [resumed.next_batch() for _ in range(23)]
    assert _ids(before) + _ids(after) == reference
    # A different seed is a different stream, and its state is refused.
    other = TaskLangSampler(idx, SamplerConfig(**{**cfg.__dict__, "seed": 8}))
    assert _ids(other.next_batch() for _ in range(3)) != reference[:3]
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprints"):
        TaskLangSampler(idx[::-1], cfg).load_state_dict(state)


def test_invalid_setups():
    only_fr = _index(8, 10, {"caption-fr": 1.0})
    with pytest.raises(ValueError, match="no entry with a key"):
        TaskLangSampler([only_fr], SamplerConfig())
    with pytest.raises(ValueError, match="one weight per dataset"):
        TaskLangSampler([_index(9, 10, PRETRAIN_AVAIL)], SamplerConfig(dataset_weights=(1.0, 2.0)))
    with pytest.raises(ConfigError, match="global_batch_size"):
        SamplerConfig(global_batch_size=10, data_parallel_size=4)
    with pytest.raises(ConfigError, match=r"SamplerConfig\.balancing: unknown preset 'lang'"):
        SamplerConfig(balancing="lang")
    with pytest.raises(ConfigError, match="SamplerConfig.target"):
        SamplerConfig(balancing="task-balancing", target={"caption-en": 1.0})
    with pytest.raises(ConfigError, match="unknown key"):
        SamplerConfig(balancing="custom", target={"caption-it": 1.0})
