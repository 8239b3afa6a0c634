"""Downstream metrics: sacrebleu's documented example, the official Multi30K captioning BLEU
(only the first 5 hypotheses count) against the correct one, the Chinese tokenizer, COCO
metrics through pycocoevalcap (Java), and CoMMuTE ambiguity accuracy on a hand-made case."""

from __future__ import annotations

import pytest
import torch

from mmcap.eval.downstream_metrics import (
    ambiguity_accuracy,
    caption_bleu_official,
    caption_bleu_per_image,
    coco_caption_metrics,
    java_available,
    sentence_ce,
    translation_bleu,
)

# sacrebleu's README example: two reference streams, BLEU = 48.53.
SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_sacrebleu_documented_example():
    per_image = [list(r) for r in zip(*REFS)]
    assert round(caption_bleu_per_image(SYS, per_image, "en"), 2) == 48.53


def test_official_caption_bleu_scores_only_first_five():
    refs = [[f"a photo of object {i} number {k} here" for k in range(5)] for i in range(8)]
    good = [f"a photo of object {i} number 0 here" for i in range(8)]
    bad_tail = good[:5] + ["completely different words now"] * 3
    # Official: the last 3 hypotheses are never looked at.
    assert caption_bleu_official(bad_tail, refs, "en") == caption_bleu_official(good, refs, "en")
    assert caption_bleu_per_image(bad_tail, refs, "en") < caption_bleu_per_image(good, refs, "en")
    assert caption_bleu_per_image(good, refs, "en") == pytest.approx(100.0)


def test_chinese_uses_the_zh_tokenizer():
    hyp, ref = ["今天天气很好我们去公园散步"], ["今天天气很好我们去公园跑步"]
    assert translation_bleu(hyp, ref, "zh") > 50
    assert translation_bleu(hyp, ref, "de") == 0.0  # 13a: one "word" each, no match
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        translation_bleu(hyp * 2, ref, "zh")


@pytest.mark.skipif(not java_available(), reason="pycocoevalcap's PTB tokenizer needs Java")
def test_coco_metrics_from_pycocoevalcap():
    refs = [["A dog runs on the grass.", "a brown dog is running"], ["Two cats sleep on a sofa."]]
    # METEOR left out: its Java process takes ~40 s to start on a busy 2-core machine.
    hyps = ["a dog runs on the grass", "two cats sleep on a sofa"]
    perfect = coco_caption_metrics(hyps, refs, meteor=False)
    wrong = coco_caption_metrics(["a red car parked", "a man rides a horse"], refs, meteor=False)
    assert perfect["BLEU_4"] > 99.9  # PTB tokenization: case and punctuation removed
    assert wrong["BLEU_4"] < 1 and wrong["CIDEr"] < perfect["CIDEr"]
    assert "cocoMETEOR" not in perfect


def test_ambiguity_accuracy_hand_made(single_rank_parallel_state):
    assert ambiguity_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 4.0])) == (
        pytest.approx(200 / 3)
    )
    from mmcap.config import PrecisionConfig, get_preset
    from mmcap.generate import GenerationConfig, generate
    from mmcap.model.build import build_model

    torch.manual_seed(0)
    model = build_model(get_preset("debug-florence"), precision=PrecisionConfig("fp32")).eval()
    prompt = torch.randint(3, 400, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    # The model's own greedy output is the "correct" translation; a shuffled one is not.
    cfg = GenerationConfig(num_beams=1, max_new_tokens=8, no_repeat_ngram_size=0)
    own = generate(model, prompt, mask, config=cfg)
    correct = [[2, *t, 1] for t in own]
    incorrect = [[2, *reversed(t), 1] if len(set(t)) > 1 else [2, 500, 501, 1] for t in own]
    ce_c = sentence_ce(model, prompt, mask, correct)
    ce_i = sentence_ce(model, prompt, mask, incorrect)
    assert ambiguity_accuracy(ce_c, ce_i) == 100.0
    # mean token CE: one sample alone gives the same value as in the batch
    alone = sentence_ce(model, prompt[:1], mask[:1], correct[:1])
    assert torch.allclose(alone, ce_c[:1], atol=1e-5)
