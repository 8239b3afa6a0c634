"""Reading and validating raw input records: official webdataset tars and JSONL.

A *record* is one tar sample (``{key}.jpg`` + ``{key}.data``, the .data a JSON list of
``{type, lang, prompt, output}``; the prompt is a task string such as ``"<LANG_DE><CAPTION>"``
in the pretraining tars, or the already expanded English text in the fine-tuning tars, whose
entries also carry ``img_path``, ``prompt_ids`` and ``output_ids``, not used here) or one
JSONL line (``{"id", "image", "type", "lang", "prompt", "output"}``). An *entry* is one
(type, lang, prompt, output) of a record. Validation returns either clean texts or a
:class:`Reject` naming the record, field and reason; the reasons are :data:`REJECT_REASONS`.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from mmcap.data.prompts import (
    LANGS,
    TASK_TOKEN_TYPES,
    TASK_TYPES,
    TRANSLATE_TOKEN,
    build_prompt,
    parse_expanded_prompt,
    parse_task_string,
)

REJECT_REASONS = (
    "bad_image",  # not a JPEG, corrupt, truncated, unreadable image file
    "missing_field",  # a required member or JSON field is absent or has the wrong type
    "bad_json",  # .data / JSONL line is not valid JSON of the expected shape
    "bad_utf8",  # bytes are not UTF-8, or text holds unpaired surrogates
    "empty_text",  # empty (or whitespace-only) prompt, output or translation source
    "too_long",  # text over max_text_chars, or tokens over the max prompt/target tokens
    "bad_task",  # unknown task token / type / language, or prompt disagreeing with type/lang
    "bad_archive",  # the tar itself is truncated or corrupt from this point on
)
JPEG_MAGIC = b"\xff\xd8\xff"
ENTRY_FIELDS = ("type", "lang", "prompt", "output")


@dataclass
class Reject:
    """One skipped record or entry; written as a line of ``rejects.jsonl``."""

    source: str
    record: str  # tar key or "line N"
    entry: int | None  # index in the .data list (None: the whole record)
    field: str
    reason: str
    message: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class EntryError(Exception):
    def __init__(self, reason: str, field: str, message: str):
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


@dataclass
class CleanEntry:
    """A validated entry: key ``"{type}-{lang}"``, task token, prompt text, target text."""

    key: str
    task_token: str
    prompt_text: str
    output: str


def check_jpeg(data: bytes, full_decode: bool = True) -> str | None:
    """None if ``data`` is a readable JPEG, else why not. A full decode at 1/8 scale (libjpeg
    DCT scaling) still entropy-decodes every block, so truncation and corruption show up."""
    from PIL import Image

    if not data.startswith(JPEG_MAGIC):
        return "not a JPEG (no FFD8FF signature)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL warns on some corrupt data / decompression bombs
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "JPEG":
                    return f"not a JPEG (PIL reads {im.format})"
                if full_decode:
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                    im.load()
    # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on corrupt data.
    except Exception as e:  # noqa: BLE001
        return f"corrupt JPEG: {type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def pil_load_truncated(enabled: bool = True):
    """PIL's process-wide ``ImageFile.LOAD_TRUNCATED_IMAGES`` set within the block (the
    official loader sets it for good); decoding threads must not overlap other PIL loads."""
    from PIL import ImageFile

    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = enabled or old
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def loads_truncated(data: bytes) -> bool:
    """True if ``data`` is a truncated JPEG that PIL decodes with ``LOAD_TRUNCATED_IMAGES``
    (the official loader's setting; the missing tail comes out grey)."""
    from PIL import Image

    if not data.startswith(JPEG_MAGIC):
        return False
    try:
        with pil_load_truncated(), Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return False
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception:  # noqa: BLE001  (still corrupt: not merely truncated)
        return False
    return True


def _text(value, name: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise EntryError(
            "missing_field", name, f"{name} must be a string, got {type(value).__name__}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EntryError("bad_utf8", name, f"{name} is not valid Unicode: {e.reason}") from None
    if not value.strip():
        raise EntryError("empty_text", name, f"{name} is empty")
    if len(value) > max_chars:
        raise EntryError("too_long", name, f"{name} has {len(value)} chars > {max_chars}")
    return value


def validate_entry(entry, max_chars: int) -> CleanEntry:
    """Check one {type, lang, prompt, output}; raises :class:`EntryError`."""
    if not isinstance(entry, dict):
        raise EntryError(
            "bad_json", "entry", f"entry must be an object, got {type(entry).__name__}"
        )
    for name in ENTRY_FIELDS:
        if name not in entry or entry[name] is None:
            raise EntryError("missing_field", name, f"field {name!r} is missing")
    task_type, lang = entry["type"], entry["lang"]
    if task_type not in TASK_TYPES:
        raise EntryError("bad_task", "type", f"type {task_type!r} is not one of {TASK_TYPES}")
    if lang not in LANGS:
        raise EntryError("bad_task", "lang", f"lang {lang!r} is not one of {LANGS}")
    prompt = _text(entry["prompt"], "prompt", max_chars)
    output = _text(entry["output"], "output", max_chars)
    if not prompt.startswith("<"):
        return _expanded_entry(prompt, output, task_type, lang)
    try:
        parsed = parse_task_string(prompt)
    except ValueError as e:
        raise EntryError("bad_task", "prompt", str(e)) from None
    if parsed.task_type != task_type or (parsed.lang is not None and parsed.lang != lang):
        raise EntryError(
            "bad_task",
            "prompt",
            f"prompt {prompt[:60]!r} disagrees with type={task_type!r} lang={lang!r}",
        )
    if parsed.task_token == TRANSLATE_TOKEN and not parsed.source.strip():
        raise EntryError("empty_text", "prompt", "translation source is empty")
    return CleanEntry(f"{task_type}-{lang}", parsed.task_token, build_prompt(prompt), output)


def _expanded_entry(prompt: str, output: str, task_type: str, lang: str) -> CleanEntry:
    """An entry whose prompt is already expanded text (official fine-tuning tars): the text is
    the encoder prompt as is; type and lang come from the entry and must agree with what the
    text names (its language sentence, its task template). A text that is none of the
    official templates is kept with the generic task token of its type (``<CAPTION>`` /
    ``<TRANSLATE>``), which only labels the stored entry."""
    try:
        named_lang, token, source = parse_expanded_prompt(prompt)
    except ValueError as e:
        raise EntryError("bad_task", "prompt", str(e)) from None
    if (token is not None and TASK_TOKEN_TYPES[token] != task_type) or (
        named_lang is not None and named_lang != lang
    ):
        raise EntryError(
            "bad_task",
            "prompt",
            f"prompt {prompt[:80]!r} names task {TASK_TOKEN_TYPES.get(token)!r} and language "
            f"{named_lang!r}, disagreeing with type={task_type!r} lang={lang!r}",
        )
    if token == TRANSLATE_TOKEN and not source.strip():
        raise EntryError("empty_text", "prompt", "translation source is empty")
    if token is None:
        token = TRANSLATE_TOKEN if task_type == "translation" else "<CAPTION>"
    return CleanEntry(f"{task_type}-{lang}", token, prompt, output)


@dataclass
class TarSample:
    ordinal: int
    key: str
    members: dict[str, bytes]  # extension -> payload
    offset: int  # bytes of the tar consumed so far (progress)


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :].lower())


def iter_tar(path: str) -> Iterator[TarSample | Reject]:
    """Samples of a webdataset tar in order (members of a sample are adjacent); a corrupt
    tail yields one ``bad_archive`` :class:`Reject` and ends the iteration."""
    ordinal, key, members = 0, None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_key(info.name)
                if key is not None and k != key:
                    yield TarSample(ordinal, key, members, tar.fileobj.tell())
                    ordinal, members = ordinal + 1, {}
                key = k
                members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield TarSample(ordinal, key, members, tar.fileobj.tell())
    except (tarfile.TarError, OSError, EOFError) as e:
        where = key if key is not None else "<start>"
        yield Reject(
            str(path),
            where,
            None,
            "tar",
            "bad_archive",
            f"archive unreadable after sample {where!r}: {type(e).__name__}: {e}",
        )


def parse_data_member(raw: bytes | None, max_chars: int):
    """The .data payload -> list of entries, or raises :class:`EntryError` for the record."""
    if raw is None:
        raise EntryError("missing_field", "data", "no .data member")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EntryError("bad_utf8", "data", f".data is not UTF-8: {e}") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise EntryError("bad_json", "data", f".data is not JSON: {e}") from None
    if not isinstance(entries, list):
        raise EntryError(
            "bad_json", "data", f".data must be a JSON list, got {type(entries).__name__}"
        )
    if not entries:
        raise EntryError("missing_field", "data", ".data is an empty list")
    return entries


def iter_jsonl(path: str) -> Iterator[tuple[int, bytes, int]]:
    """(1-based line number, raw line, bytes consumed) of non-blank lines."""
    with open(path, "rb") as f:
        pos = 0
        for n, line in enumerate(f, start=1):
            pos += len(line)
            if line.strip():
                yield n, line, pos


def parse_jsonl_line(raw: bytes) -> dict:
    """Raw line -> object, or raises :class:`EntryError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EntryError("bad_utf8", "line", f"line is not UTF-8: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise EntryError("bad_json", "line", f"line is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise EntryError(
            "bad_json", "line", f"line must be a JSON object, got {type(obj).__name__}"
        )
    return obj
