"""Official fine-tuning tars (expanded English prompts, ``img_path``, ``%06d`` keys, 5,000
records per ``%06d.tar``): every entry ingested, ids = the encoder tokenization of the text."""

import json
import random
import tarfile

import numpy as np
import pytest

from mmcap.data.indexed import TASK_TOKENS, CaptionDataset
from mmcap.data.preprocess import preprocess
from mmcap.data.prompts import FINETUNING_KEYS, build_prompt, parse_expanded_prompt
from mmcap.data.records import EntryError, validate_entry
from mmcap.data.testing import finetuning_entries, make_jpeg, write_finetuning_tars


def _records(n, loaded_tokenizers, seed=0):
    target, prompt = loaded_tokenizers
    rng = random.Random(seed)
    out = []
    for i in range(n):
        keys = rng.sample(list(FINETUNING_KEYS), k=rng.randint(1, 6))
        entries = finetuning_entries(rng, keys, f"/data/img/{i}.jpg", prompt, target)
        out.append((make_jpeg(100 + i, size=(32 + i, 24)), entries))
    return out


def test_layout_matches_official_shardwriter(tmp_path, loaded_tokenizers):
    records = _records(7, loaded_tokenizers)
    paths = write_finetuning_tars(tmp_path, records, per_tar=3)
    assert [p.name for p in paths] == ["000000.tar", "000001.tar", "000002.tar"]
    with tarfile.open(paths[1]) as tar:
        names = tar.getnames()
    assert names == [f"{k:06d}.{e}" for k in (3, 4, 5) for e in ("data", "jpg")]
    # One tar of the default size holds all 7 (the official 5,000 per tar).
    assert len(write_finetuning_tars(tmp_path / "one", records)) == 1


def test_every_entry_kept_with_encoder_ids_of_the_expanded_prompt(
    tmp_path, tiny_tokenizers, loaded_tokenizers
):
    gemma, bart = tiny_tokenizers
    target, prompt = loaded_tokenizers
    records = _records(7, loaded_tokenizers, seed=1)
    write_finetuning_tars(tmp_path / "tars", records, per_tar=3)
    manifest = preprocess(
        [str(tmp_path / "tars" / "*.tar")], gemma, bart, str(tmp_path / "out"), show_progress=False
    )
    assert sum(manifest["rejects"].values()) == 0, manifest["rejects"]
    ds = CaptionDataset(tmp_path / "out")
    by_key = {f"{i:06d}": r for i, r in enumerate(records)}
    assert len(ds) == sum(len(e) for _, e in records) == manifest["counts"]["entries"]
    assert ds.num_groups == len(records)
    for row in range(len(ds)):
        t = ds.trace(row)
        jpg, entries = by_key[t["record_id"]]
        raw = entries[t["entry"]]
        assert t["key"] == f"{raw['type']}-{raw['lang']}"
        # The stored encoder ids are the tokenization of the expanded text, which is what the
        # official bake wrote to prompt_ids with the same tokenizer.
        np.testing.assert_array_equal(ds.prompt_ids(row), prompt.encode([raw["prompt"]])[0])
        np.testing.assert_array_equal(ds.prompt_ids(row), raw["prompt_ids"])
        np.testing.assert_array_equal(ds.target_ids(row), raw["output_ids"])
        assert ds.image_bytes(int(ds.entries["image"][row])) == jpg
        want = "<TRANSLATE>" if raw["type"] == "translation" else None
        if want:
            assert TASK_TOKENS[ds.entries["task"][row]] == want
        else:
            assert TASK_TOKENS[ds.entries["task"][row]] != "<TRANSLATE>"


@pytest.mark.parametrize(
    "task_string",
    [
        "<LANG_DE><CAPTION>",
        "<LANG_ZH><MORE_DETAILED_CAPTION>",
        "<LANG_RU><TRANSLATE>A dog.",
        "<CAPTION>",
    ],
)
def test_expanded_prompt_parses_back(task_string):
    from mmcap.data.prompts import parse_task_string

    t = parse_task_string(task_string)
    assert parse_expanded_prompt(build_prompt(task_string)) == (t.lang, t.task_token, t.source)


def _entry(prompt, type_="caption", lang="de"):
    return {"type": type_, "lang": lang, "prompt": prompt, "output": "Ein Hund."}


def test_expanded_entry_kept_as_is():
    text = "The target language is German. Describe in detail what is shown in the image."
    clean = validate_entry(_entry(text), 1000)
    assert (clean.key, clean.task_token, clean.prompt_text) == (
        "caption-de",
        "<DETAILED_CAPTION>",
        text,
    )
    # Not an official template: the text is still the encoder prompt, labelled by its type.
    clean = validate_entry(_entry("Say what you see.", "caption", "fr"), 1000)
    assert (clean.key, clean.task_token, clean.prompt_text) == (
        "caption-fr",
        "<CAPTION>",
        "Say what you see.",
    )


@pytest.mark.parametrize(
    "prompt, type_, lang, reason, words",
    [
        ("The target language is French. What does the image describe?", "caption", "de",
         "bad_task", "'fr'"),
        ("The target language is German. Translate the following text: A dog.", "caption", "de",
         "bad_task", "'translation'"),
        ("The target language is Italian. What does the image describe?", "caption", "de",
         "bad_task", "'Italian'"),
        ("The target language is German. Translate the following text:  ", "translation", "de",
         "empty_text", "source"),
    ],
)
def test_expanded_entry_disagreeing_is_rejected(prompt, type_, lang, reason, words):
    with pytest.raises(EntryError) as e:
        validate_entry(_entry(prompt, type_, lang), 1000)
    assert (e.value.reason, e.value.field) == (reason, "prompt")
    assert words in e.value.message


def test_official_tar_entries_are_json_the_official_way(tmp_path, loaded_tokenizers):
    # json.dumps without ensure_ascii=False (as bake.py): non-ASCII text is \u-escaped.
    records = _records(2, loaded_tokenizers, seed=2)
    (path,) = write_finetuning_tars(tmp_path, records)
    with tarfile.open(path) as tar:
        data = tar.extractfile("000000.data").read()
    assert data.isascii() and json.loads(data) == records[0][1]
