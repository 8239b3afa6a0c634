#!/usr/bin/env python
"""The end-to-end demo behind ``make demo`` (CPU, 2 processes, minutes):

1. builds the demo dataset from the photographs and texts shipped in ``examples/demo/`` in
   the official webdataset tar layout and preprocesses it (``tools/make_demo_data.py``);
2. trains ``debug-gemma`` with ``torchrun --nproc-per-node 2 -m mmcap.train`` at TP=2
   (``examples/demo/demo.yaml``): the first job stops at step 150 with a checkpoint
   (``exit_interval``), the second resumes it (``--resume auto``) and finishes step 300, with
   validation CE per split every 50 steps;
3. evaluates the final checkpoint per split (SC / UC / ST) with ``tools/eval_loss.py`` under
   torchrun at PP=2 (another layout than training);
4. exports it to Hugging Face (``tools/convert_to_hf.py``: weights, config and processor)
   and loads it back with ``AutoModelForImageTextToText`` + ``AutoProcessor``, captioning
   one demo image with ``generate()``;
5. captions the held-out images in the trained (en, de) and unseen (fr, es, zh, ru) caption
   languages, with and without the zero-shot prefix (``mmcap.generate``, 4 beams), and draws
   the loss curve and the CE per split (``python -m mmcap.eval.demo_report``);
6. prints the captions, the CE and where everything went.

    python tools/demo.py [--out demo_out] [--steps 300] [--fresh]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], log: Path, env: dict) -> float:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        p = subprocess.Popen(
            [str(c) for c in cmd],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in p.stdout:
            f.write(line)
            if "mmcap.train:" in line or line.startswith(("error", "Traceback", "loaded")):
                print("    " + line.rstrip(), flush=True)
        rc = p.wait()
    if rc != 0:
        sys.exit(f"demo: command failed with exit code {rc}; see {log}")
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument("--fresh", action="store_true", help="delete OUT first")
    args = ap.parse_args(argv)
    from mmcap.data.prompts import ZERO_SHOT_PREFIXES

    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    env = dict(
        os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO)
    )
    py = sys.executable
    times = {}
    t_start = time.time()

    print("== 1/6 demo data (official tar layout) + preprocessing", flush=True)
    times["data"] = _run(
        [py, "tools/make_demo_data.py", "--out", out / "data", "--preprocess"], log, env
    )
    json.loads((out / "data" / "demo.json").read_text())  # complete

    ckpt = out / "ckpt"
    train_args = [
        "--config",
        "examples/demo/demo.yaml",
        f"data.train=[{out / 'data' / 'train'}]",
        f"data.valid={out / 'data' / 'eval'}",
        f"checkpoint.save={ckpt}",
        f"train_steps={args.steps}",
        f"exit_interval={args.steps // 2}",
    ]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    print(f"== 2/6 training, job 1 (TP=2, steps 0 -> {args.steps // 2})", flush=True)
    times["train_job1"] = _run([*torchrun, "-m", "mmcap.train", *train_args], log, env)
    print(f"== 2/6 training, job 2 (--resume auto, -> {args.steps})", flush=True)
    times["train_job2"] = _run(
        [*torchrun, "-m", "mmcap.train", *train_args, "--resume", "auto"], log, env
    )
    final = ckpt / (ckpt / "latest").read_text().strip()

    print("== 3/6 CE per split of the final checkpoint (PP=2)", flush=True)
    results = out / "eval_results.json"
    times["eval"] = _run(
        [
            *torchrun,
            "tools/eval_loss.py",
            "--ckpt",
            final,
            "--data",
            out / "data" / "eval",
            "--out",
            results,
            "--pp",
            "2",
            "--image-size",  # the demo model's 64 px (the official eval default is 224)
            "checkpoint",
        ],
        log,
        env,
    )

    print("== 4/6 export to Hugging Face", flush=True)
    hf = out / "hf"
    times["export"] = _run(
        [py, "tools/convert_to_hf.py", "--ckpt", final, "--out", hf, "--overwrite"], log, env
    )
    # The export is complete: the processor (both tokenizers, the image size) loads with it.
    check = (
        "import mmcap.hf, glob\n"
        "from PIL import Image\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(hf)!r})\n"
        f"p = AutoProcessor.from_pretrained({str(hf)!r})\n"
        "n = sum(t.numel() for t in m.parameters())\n"
        "image = Image.open(sorted(glob.glob('examples/demo/images/*.jpg'))[0])\n"
        "ids = m.generate(**p(images=[image], text=['<LANG_EN><CAPTION>']), max_new_tokens=24)\n"
        "print(f'loaded {type(m).__name__} with {n:,} parameters and its processor; '\n"
        "      f'caption of {image.filename}: {p.batch_decode(ids)[0]!r}')\n"
    )
    times["hf_load"] = _run([py, "-c", check], log, env)

    print("== 5/6 captions of the held-out images, loss curve, CE per split", flush=True)
    report = out / "report"
    sources = json.loads((out / "data" / "demo.json").read_text())["sources"]
    times["captions_plots"] = _run(
        [
            py,
            "-m",
            "mmcap.eval.demo_report",
            "--ckpt",
            final,
            "--bart-tokenizer",
            out / "data" / sources["encoder_tokenizer"],
            "--gemma-tokenizer",
            out / "data" / sources["gemma_tokenizer"],
            "--metrics",
            ckpt / "metrics.jsonl",
            "--ce",
            results,
            "--out",
            report,
        ],
        log,
        env,
    )

    print("== 6/6 summary", flush=True)
    res = json.loads(results.read_text())
    history = {}
    for line in (ckpt / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval/SC" in rec:
            history[rec["step"]] = rec
    first_loss = last_loss = None
    for line in (ckpt / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            first_loss = rec["loss"] if first_loss is None else first_loss
            last_loss = rec["loss"]
    print(f"train loss: step 1 {first_loss:.4f} -> step {args.steps} {last_loss:.4f}")
    print("validation CE during training (held-out images):")
    print("  step      SC      UC      ST")
    for step, rec in sorted(history.items()):
        print(
            f"  {step:4d}  "
            + "  ".join(f"{rec.get('eval/' + s, float('nan')):6.3f}" for s in ("SC", "UC", "ST"))
        )
    print("final checkpoint, tools/eval_loss.py at PP=2:")
    for name, split in res["splits"].items():
        print(
            f"  {name}: CE {split['ce']:.4f} over {split['samples']} samples "
            f"({', '.join(split['keys'])})"
        )
    print("captions of the held-out images (4 beams; [prefix] = zero-shot decoder prefix):")
    rows = json.loads((report / "captions.json").read_text())
    for key in dict.fromkeys(r["image"] for r in rows):
        print(f"  {key}:")
        for r in rows:
            if r["image"] == key:
                seen = "seen  " if r["seen"] else "unseen"
                pre = f"[{ZERO_SHOT_PREFIXES[r['lang']]}] " if r["prefix"] else ""
                print(f"    {r['lang']} {seen} {pre}{r['caption']}")
    total = time.time() - t_start
    print(
        "timings (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f", total {total:.0f}"
    )
    print("outputs:")
    for label, path in [
        ("demo data (tars, tokenizers)", out / "data" / "sources"),
        ("indexed train / eval data", f"{out / 'data' / 'train'}, {out / 'data' / 'eval'}"),
        ("checkpoints", ckpt),
        ("final checkpoint", final),
        ("metrics (JSON lines)", ckpt / "metrics.jsonl"),
        ("TensorBoard", ckpt / "tensorboard"),
        ("eval results", results),
        ("Hugging Face export", hf),
        ("held-out captions", f"{report / 'captions.md'}, {report / 'captions.json'}"),
        ("loss curve (PNG)", report / "loss_curve.png"),
        ("CE per split (PNG)", report / "ce_per_split.png"),
        ("full log", log),
    ]:
        print(f"  {label}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
