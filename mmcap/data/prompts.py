"""Task strings -> encoder prompt text, and the task-language keys that sampling balances.

A task string is what the official data stores in ``prompt``: at most one language modifier,
then one task token, then (for ``<TRANSLATE>`` only) the source text, e.g.
``"<LANG_DE><CAPTION>"`` or ``"<LANG_FR><TRANSLATE>A dog on the grass."``. The encoder sees the
expanded text (official Florence-2 processor, SYSTEM.md "Tasks and prompts"): modifier text and
task text joined by one space.

Keys name what a sample teaches, ``"{type}-{lang}"`` as in the official sampler
(``caption-en``, ``translation-de``); each key has a fixed small integer id
(:data:`KEY_IDS`) so the stored datasets and the sampler never parse strings.
"""

from __future__ import annotations

from dataclasses import dataclass

LANGS: tuple[str, ...] = ("en", "de", "fr", "es", "zh", "ru")
LANG_NAMES: dict[str, str] = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "zh": "simplified Chinese",
    "ru": "Russian",
}
LANG_MODIFIERS: dict[str, str] = {
    f"<LANG_{code.upper()}>": f"The target language is {name}." for code, name in LANG_NAMES.items()
}

TASK_TYPES: tuple[str, ...] = ("caption", "translation")
# Task tokens without input: the token must be the whole rest of the string.
CAPTION_TOKENS: dict[str, str] = {
    "<CAPTION>": "What does the image describe?",
    "<DETAILED_CAPTION>": "Describe in detail what is shown in the image.",
    "<MORE_DETAILED_CAPTION>": "Describe with a paragraph what is shown in the image.",
}
TRANSLATE_TOKEN = "<TRANSLATE>"
TRANSLATE_TEMPLATE = "Translate the following text: {src}"
TASK_TOKEN_TYPES: dict[str, str] = {
    **{t: "caption" for t in CAPTION_TOKENS},
    TRANSLATE_TOKEN: "translation",
}

# Zero-shot decoder prefixes (eval): decoder_input_ids = [<bos>, prefix...].
ZERO_SHOT_PREFIXES: dict[str, str] = {
    "en": "The image shows",
    "de": "Das Bild zeigt",
    "fr": "La photo montre",
    "es": "La imagen muestra",
    "ru": "На картинке изображен",
    "zh": "图为",
}

# Every (type, lang) pair, id = type_index * len(LANGS) + lang_index. Stored as uint8.
ALL_KEYS: tuple[str, ...] = tuple(f"{t}-{lang}" for t in TASK_TYPES for lang in LANGS)
KEY_IDS: dict[str, int] = {k: i for i, k in enumerate(ALL_KEYS)}
# SYSTEM.md "Data": task-lang-balancing over 7 keys in pretraining, 11 in fine-tuning.
PRETRAINING_KEYS: tuple[str, ...] = (
    "caption-en",
    "caption-de",
    "translation-de",
    "translation-fr",
    "translation-es",
    "translation-zh",
    "translation-ru",
)
FINETUNING_KEYS: tuple[str, ...] = tuple(f"caption-{lang}" for lang in LANGS) + tuple(
    f"translation-{lang}" for lang in LANGS if lang != "en"
)


@dataclass(frozen=True)
class TaskString:
    """A parsed task string.

    Args:
        lang: language code of the modifier ("de"), or None without one.
        task_token: "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>" or "<TRANSLATE>".
        source: the text to translate (``<TRANSLATE>`` only), else None.
    """

    lang: str | None
    task_token: str
    source: str | None = None

    @property
    def task_type(self) -> str:
        return TASK_TOKEN_TYPES[self.task_token]


def parse_task_string(task_string: str) -> TaskString:
    """Split ``[<LANG_XX>]<TASK>[source]``; ValueError names what is wrong."""
    if not isinstance(task_string, str):
        raise TypeError(f"task string must be str, got {type(task_string).__name__}")
    rest, lang = task_string, None
    for token in LANG_MODIFIERS:
        if rest.startswith(token):
            lang, rest = token[len("<LANG_") : -1].lower(), rest[len(token) :]
            break
    if rest.startswith("<LANG_"):
        raise ValueError(
            f"unknown or repeated language modifier in {task_string!r}; "
            f"expected at most one of {sorted(LANG_MODIFIERS)}"
        )
    if rest.startswith(TRANSLATE_TOKEN):
        return TaskString(lang, TRANSLATE_TOKEN, rest[len(TRANSLATE_TOKEN) :])
    if rest in CAPTION_TOKENS:
        return TaskString(lang, rest)
    head = rest[: rest.find(">") + 1] if rest.startswith("<") and ">" in rest else rest[:40]
    if head in CAPTION_TOKENS:
        raise ValueError(f"task token {head} takes no input, got {task_string!r}")
    raise ValueError(
        f"unknown task token {head!r} in {task_string!r}; expected an optional language "
        f"modifier then one of {sorted(TASK_TOKEN_TYPES)}"
    )


def build_prompt(task_string: str) -> str:
    """Encoder prompt text for a task string (official processor's ``_construct_prompts``).

    >>> build_prompt("<LANG_DE><CAPTION>")
    'The target language is German. What does the image describe?'
    """
    t = parse_task_string(task_string)
    if t.task_token == TRANSLATE_TOKEN:
        text = TRANSLATE_TEMPLATE.format(src=t.source)
    else:
        text = CAPTION_TOKENS[t.task_token]
    if t.lang is None:
        return text
    return f"{LANG_MODIFIERS['<LANG_' + t.lang.upper() + '>']} {text}"


LANG_MODIFIER_PREFIX = "The target language is "


def parse_expanded_prompt(text: str) -> tuple[str | None, str | None, str | None]:
    """(language named, task token, translation source) of an already EXPANDED prompt.

    Official fine-tuning tars (``finetuning_dataset/bake.py``) store the processor's output,
    e.g. ``"The target language is German. What does the image describe?"``. The language is
    None without a modifier sentence; the task token is None when the task text is none of the
    official templates (the text is still a valid prompt: it is fed to the encoder as is);
    the source is set for ``"Translate the following text: {src}"`` only. ValueError when the
    text opens with a modifier sentence naming a language outside :data:`LANG_NAMES`.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be str, got {type(text).__name__}")
    lang, rest = None, text
    if rest.startswith(LANG_MODIFIER_PREFIX):
        for code, modifier in ((c, LANG_MODIFIERS[f"<LANG_{c.upper()}>"]) for c in LANGS):
            if rest == modifier or rest.startswith(modifier + " "):
                lang, rest = code, rest[len(modifier) + 1 :]
                break
        else:
            named = rest[len(LANG_MODIFIER_PREFIX) :].split(".", 1)[0]
            raise ValueError(
                f"prompt names target language {named!r}, not one of "
                f"{sorted(LANG_NAMES.values())}: {text[:80]!r}"
            )
    for token, task_text in CAPTION_TOKENS.items():
        if rest == task_text:
            return lang, token, None
    head = TRANSLATE_TEMPLATE.split("{src}")[0]
    if rest.startswith(head):
        return lang, TRANSLATE_TOKEN, rest[len(head) :]
    return lang, None, None


def task_string(task_type: str, lang: str | None, source: str | None = None) -> str:
    """Inverse of :func:`parse_task_string` for the short caption and translation tasks."""
    mod = "" if lang is None else f"<LANG_{lang.upper()}>"
    if task_type == "caption":
        return f"{mod}<CAPTION>"
    if task_type == "translation":
        return f"{mod}{TRANSLATE_TOKEN}{source or ''}"
    raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")


def task_lang_key(task_type: str, lang: str) -> str:
    """``"caption-de"``; ValueError for a type or language outside the tables."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES}")
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected one of {LANGS}")
    return f"{task_type}-{lang}"


def key_id(key: str) -> int:
    """Integer id of a task-language key (stable: position in :data:`ALL_KEYS`)."""
    try:
        return KEY_IDS[key]
    except KeyError:
        raise ValueError(f"unknown task-language key {key!r}; expected one of {ALL_KEYS}") from None


def zero_shot_prefix(lang: str) -> str:
    """Decoder prefix for zero-shot captioning in ``lang`` (eval)."""
    try:
        return ZERO_SHOT_PREFIXES[lang]
    except KeyError:
        raise ValueError(
            f"no zero-shot prefix for {lang!r}; known: {sorted(ZERO_SHOT_PREFIXES)}"
        ) from None
