"""The state-dict key list in mmcap.hf.modeling_mmcap's docstring is exact for both families.

Converter key tables are written against that list, so every real key must match exactly one
template of its family and every template must match at least one real key.
"""

import re

import pytest

import mmcap.hf.modeling_mmcap as modeling
from mmcap.testing.hf_models import tiny_florence2, tiny_gemma2
from tests.hf._tiny import florence_family, gemma_family

SECTIONS = {"Both families:": "both", "Florence family": "florence", "Gemma family": "gemma2"}


def _templates() -> dict[str, list[str]]:
    out, section = {v: [] for v in SECTIONS.values()}, None
    for line in modeling.__doc__.splitlines():
        stripped = line.strip()
        for head, name in SECTIONS.items():
            if stripped.startswith(head):
                section = name
        if section and stripped.startswith(("model.", "lm_head.")):
            out[section].append(stripped.split()[0])
    return out


def _regex(template: str) -> re.Pattern:
    def alt(m):
        body = m.group(1)
        return r"\d+" if body in ("i", "s", "b") else "(?:" + "|".join(body.split(",")) + ")"

    pattern = re.sub(r"\\\{([^}]*)\\\}", alt, re.escape(template))
    return re.compile(pattern + "$")


@pytest.mark.parametrize("family", ["florence", "gemma2"])
def test_docstring_lists_every_key(family):
    native = tiny_florence2(seed=0)
    model = florence_family(native) if family == "florence" else gemma_family(native, tiny_gemma2())
    templates = _templates()
    patterns = {t: _regex(t) for t in templates["both"] + templates[family]}
    used = dict.fromkeys(patterns, 0)
    for key in model.state_dict():
        hits = [t for t, p in patterns.items() if p.match(key)]
        assert len(hits) == 1, (key, hits)
        used[hits[0]] += 1
    assert all(used.values()), [t for t, n in used.items() if not n]
