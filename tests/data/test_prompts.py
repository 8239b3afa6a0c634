"""Prompt construction: exact strings of SYSTEM.md "Tasks and prompts", keys, errors."""

import pytest

from mmcap.data.prompts import (
    ALL_KEYS,
    FINETUNING_KEYS,
    PRETRAINING_KEYS,
    build_prompt,
    key_id,
    parse_task_string,
    task_lang_key,
    task_string,
    zero_shot_prefix,
)

CAPTION = "What does the image describe?"
DETAILED = "Describe in detail what is shown in the image."
MORE = "Describe with a paragraph what is shown in the image."


@pytest.mark.parametrize(
    "task, expected",
    [
        ("<LANG_DE><CAPTION>", "The target language is German. " + CAPTION),
        ("<LANG_EN><CAPTION>", "The target language is English. " + CAPTION),
        ("<LANG_FR><DETAILED_CAPTION>", "The target language is French. " + DETAILED),
        ("<LANG_ES><MORE_DETAILED_CAPTION>", "The target language is Spanish. " + MORE),
        ("<LANG_ZH><CAPTION>", "The target language is simplified Chinese. " + CAPTION),
        ("<LANG_RU><CAPTION>", "The target language is Russian. " + CAPTION),
        ("<CAPTION>", CAPTION),
        ("<MORE_DETAILED_CAPTION>", MORE),
        (
            "<LANG_FR><TRANSLATE>A dog on the grass.",
            "The target language is French. Translate the following text: A dog on the grass.",
        ),
        ("<TRANSLATE> two  spaces kept <b>", "Translate the following text:  two  spaces kept <b>"),
        (
            "<LANG_ZH><TRANSLATE>Ein Hund.",
            "The target language is simplified Chinese. Translate the following text: Ein Hund.",
        ),
    ],
)
def test_build_prompt_exact(task, expected):
    assert build_prompt(task) == expected


@pytest.mark.parametrize(
    "bad, words",
    [
        ("<LANG_IT><CAPTION>", "language modifier"),
        ("<LANG_DE><LANG_FR><CAPTION>", "language modifier"),
        ("<OD>", "unknown task token"),
        ("<LANG_DE>", "unknown task token"),
        ("<CAPTION>extra text", "takes no input"),
        ("What does the image describe?", "unknown task token"),
        ("<CAPTION><LANG_DE>", "takes no input"),
    ],
)
def test_unknown_or_malformed_tokens_raise(bad, words):
    with pytest.raises(ValueError, match=words):
        build_prompt(bad)


def test_parse_and_inverse():
    t = parse_task_string("<LANG_ES><TRANSLATE>Hello")
    assert (t.lang, t.task_token, t.source, t.task_type) == (
        "es",
        "<TRANSLATE>",
        "Hello",
        "translation",
    )
    assert parse_task_string("<DETAILED_CAPTION>").lang is None
    assert task_string("caption", "de") == "<LANG_DE><CAPTION>"
    assert task_string("translation", "zh", "Hi") == "<LANG_ZH><TRANSLATE>Hi"


def test_keys():
    assert len(PRETRAINING_KEYS) == 7 and len(FINETUNING_KEYS) == 11
    assert set(PRETRAINING_KEYS) == {
        "caption-en",
        "caption-de",
        "translation-de",
        "translation-fr",
        "translation-es",
        "translation-zh",
        "translation-ru",
    }
    assert "translation-en" not in FINETUNING_KEYS
    assert {f"caption-{x}" for x in ("en", "de", "fr", "es", "zh", "ru")} <= set(FINETUNING_KEYS)
    assert task_lang_key("caption", "de") == "caption-de"
    assert [key_id(k) for k in ALL_KEYS] == list(range(len(ALL_KEYS)))
    with pytest.raises(ValueError, match="unknown language"):
        task_lang_key("caption", "it")
    with pytest.raises(ValueError, match="unknown task type"):
        task_lang_key("vqa", "en")


def test_zero_shot_prefixes():
    assert zero_shot_prefix("de") == "Das Bild zeigt"
    assert zero_shot_prefix("ru") == "На картинке изображен"
    assert zero_shot_prefix("zh") == "图为"
    with pytest.raises(ValueError):
        zero_shot_prefix("it")
