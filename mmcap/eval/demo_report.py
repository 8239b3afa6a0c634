"""What ``make demo`` shows of a trained checkpoint: captions of the held-out demo images in
the trained and the unseen caption languages, with and without the zero-shot prefix, a
loss-curve PNG (from the trainer's ``metrics.jsonl``) and a CE-per-split PNG (from the
``tools/eval_loss.py`` results). Run by ``tools/demo.py`` as

    python -m mmcap.eval.demo_report --ckpt CKPT --bart-tokenizer DIR --gemma-tokenizer FILE \
        --metrics metrics.jsonl --ce eval_results.json --out OUT

and writes ``OUT/captions.json``, ``OUT/captions.md``, ``OUT/loss_curve.png`` and
``OUT/ce_per_split.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mmcap.data.demo import DEMO_DIR, TRAIN_CAPTION_LANGS, load_demo_texts
from mmcap.data.prompts import LANGS, ZERO_SHOT_PREFIXES

SPLIT_ORDER = ("SC", "UC", "ST", "mean")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> dict[int, dict]:
    """step -> merged record of the trainer's JSON lines (a resumed run's later line wins);
    ValueError names the file and line of a bad one."""
    steps: dict[int, dict] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{n}: not a metrics record with 'step' ({e!r})") from e
        steps.setdefault(step, {}).update(rec)
    return steps


def plot_loss_curve(metrics: str | Path, out: str | Path) -> Path:
    """Training loss per step and validation CE per split (``eval/SC`` ...) on one axis."""
    steps = read_metrics(metrics)
    train = [(s, r["loss"]) for s, r in sorted(steps.items()) if _finite(r.get("loss"))]
    if not train:
        raise ValueError(f"{metrics}: no 'loss' records to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", color="0.4", lw=1)
    for split in SPLIT_ORDER[:3]:
        pts = [
            (s, r[f"eval/{split}"])
            for s, r in sorted(steps.items())
            if _finite(r.get(f"eval/{split}"))
        ]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"validation CE {split}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("make demo: training loss and held-out CE per split")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, plt, out)


def plot_ce_per_split(ce_results: str | Path, out: str | Path) -> Path:
    """Bars of the final checkpoint's CE per split and per task-language key."""
    res = json.loads(Path(ce_results).read_text(encoding="utf-8"))
    try:
        splits = {k: res["splits"][k]["ce"] for k in SPLIT_ORDER if k in res["splits"]}
        keys = {k: v["ce"] for k, v in res["keys"].items()}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{ce_results}: not a tools/eval_loss.py result ({e!r})") from e
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 3]})
    for ax, data, title in ((a, splits, "per split"), (b, keys, "per key")):
        names = [k for k, v in data.items() if _finite(v)]
        bars = ax.bar(names, [data[k] for k in names], color="tab:blue")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(f"held-out CE {title}")
        ax.tick_params(axis="x", rotation=30)
    a.set_ylabel("cross-entropy (nats / token)")
    return _save(fig, plt, out)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _save(fig, plt, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def held_out_captions(
    ckpt,
    *,
    bart_tokenizer=None,
    gemma_tokenizer=None,
    langs=LANGS,
    beams: int = 4,
    max_new_tokens: int = 48,
    demo_dir: str | Path | None = None,
) -> list[dict]:
    """One record per held-out image x language x prefix: ``{"image", "lang", "seen",
    "prefix", "caption", "reference"}`` (``caption`` is the text after the prefix)."""
    from mmcap.generate.pipeline import caption, generation_config, load_pipeline

    demo_dir = Path(demo_dir or DEMO_DIR)
    images = [im for im in load_demo_texts(demo_dir)[0] if im.split == "eval"]
    paths = [str(im.path(demo_dir)) for im in images]
    pipe = load_pipeline(ckpt, None, bart_tokenizer, gemma_tokenizer)
    cfg = generation_config(beams, max_new_tokens, text_rows_only=True)
    rows = []
    for lang in langs:
        for prefix in (False, True):
            for im, text in zip(images, caption(pipe, paths, lang, prefix, cfg), strict=True):
                rows.append(
                    {
                        "image": im.key,
                        "lang": lang,
                        "seen": lang in TRAIN_CAPTION_LANGS,
                        "prefix": prefix,
                        "caption": text,
                        "reference": im.caption.get(lang),
                    }
                )
    return rows


def captions_markdown(rows: list[dict]) -> str:
    """One table per image: language (seen / unseen), caption without and with the prefix
    (shown in brackets), and the reference where the demo texts have one."""
    out = []
    for key in dict.fromkeys(r["image"] for r in rows):
        out += [
            f"### {key}",
            "",
            "| lang | no prefix | with prefix | reference |",
            "|---|---|---|---|",
        ]
        mine = [r for r in rows if r["image"] == key]
        for lang in dict.fromkeys(r["lang"] for r in mine):
            plain = next(r for r in mine if r["lang"] == lang and not r["prefix"])
            pref = next(r for r in mine if r["lang"] == lang and r["prefix"])
            seen = "seen" if plain["seen"] else "unseen"
            cells = [
                f"{lang} ({seen})",
                plain["caption"] or "(empty)",
                f"[{ZERO_SHOT_PREFIXES[lang]}] {pref['caption']}",
                plain["reference"] or "-",
            ]
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--bart-tokenizer", default=None)
    ap.add_argument("--gemma-tokenizer", default=None)
    ap.add_argument("--metrics", required=True, help="the trainer's metrics.jsonl")
    ap.add_argument("--ce", required=True, help="tools/eval_loss.py results JSON")
    ap.add_argument("--out", required=True)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        rows = held_out_captions(
            args.ckpt,
            bart_tokenizer=args.bart_tokenizer,
            gemma_tokenizer=args.gemma_tokenizer,
            beams=args.beams,
            max_new_tokens=args.max_new_tokens,
        )
        (out / "captions.json").write_text(
            json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8"
        )
        md = captions_markdown(rows)
        (out / "captions.md").write_text(md, encoding="utf-8")
        plot_loss_curve(args.metrics, out / "loss_curve.png")
        plot_ce_per_split(args.ce, out / "ce_per_split.png")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
