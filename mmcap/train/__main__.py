"""``torchrun [...] -m mmcap.train --preset NAME [--config FILE.yaml] [key=value ...]``

Examples::

    # one process (CPU or one GPU), on the demo data (make demo): a small global batch
    python -m mmcap.train --preset debug-gemma data.train=[demo_out/data/train] \\
        global_batch_size=16 micro_batch_size=8 optim.lr=2e-3 optim.warmup_steps=10 \\
        train_steps=100 precision.params_dtype=fp32 checkpoint.save=runs/debug
    # 8 GPUs of one node, TP=2 PP=2 DP=2
    torchrun --nproc-per-node 8 -m mmcap.train --preset florence-gemma-2-xlarge \\
        --config examples/pretrain/florence-gemma-2-xlarge.yaml checkpoint.save=ckpt/xl
    # continue the newest complete checkpoint of checkpoint.save (the default)
    torchrun ... -m mmcap.train ... --resume auto

Configuration keys: ``mmcap/train/config.py`` (TrainConfig); ``--print-config`` shows the
resolved configuration and exits. Exit codes: 0 done (or checkpointed after SIGTERM / SIGINT),
2 bad configuration, 3 stopped after ``max_bad_steps`` non-finite steps in a row, 4 a checkpoint
could not be saved (disk full, ...) or read (damaged, does not fit the model).
"""

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m mmcap.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", help="model preset (overrides the config file's preset)")
    ap.add_argument("--config", help="YAML file of TrainConfig keys")
    ap.add_argument(
        "--resume",
        help="auto (newest complete checkpoint of checkpoint.save), none, or a checkpoint dir",
    )
    ap.add_argument("--print-config", action="store_true", help="print the config and exit")
    ap.add_argument(
        "--quiet", action="store_true", help="console: warnings and errors only (log file: all)"
    )
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-4 train_steps=10")
    return ap.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of parsed command-line arguments (raises ConfigError)."""
    from mmcap.train.overrides import load_train_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_train_config(args.preset, args.config, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmcap.config import ConfigError

    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"mmcap.train: configuration error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from mmcap.config.serialize import model_config_to_dict

        # The resolved model (preset + overrides) in place of the overrides: a valid config.
        resolved = {**cfg.to_dict(), "model": model_config_to_dict(cfg.model_config())}
        print(json.dumps(resolved, indent=2))
        return 0
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(are|is) not")
    from mmcap.checkpoint.integrity import CheckpointError
    from mmcap.train.checkpoint import CheckpointSaveError
    from mmcap.train.loop import run

    try:
        return run(cfg, quiet=args.quiet)
    except ConfigError as e:
        print(f"mmcap.train: configuration error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, CheckpointSaveError) as e:
        print(f"mmcap.train: checkpoint error: {e}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
