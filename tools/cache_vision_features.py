#!/usr/bin/env python
"""Run the frozen vision tower once over a dataset's images and cache its output (bf16).

    python tools/cache_vision_features.py --dataset data/cc12m --preset florence-2-large \\
        --checkpoint Florence-2-large/ --layout official --image-size 224 \\
        --out data/cc12m.features224 [--device cuda --backend torchvision --dtype bf16]

States the storage it will take (50 x 1024 bf16 values per image at 224 px, 577 x 1024 at
768 px for the large tower) before writing; see mmcap/data/features.py.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", required=True, help="preprocessed dataset directory")
    ap.add_argument("--preset", required=True, help="model preset naming the vision config")
    ap.add_argument("--checkpoint", help="Florence-2 safetensors directory (vision weights)")
    ap.add_argument("--layout", default="official", choices=("official", "hf"))
    ap.add_argument("--random-init", action="store_true", help="no checkpoint (tests, demos)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="pil", choices=("pil", "torchvision", "dali"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="forward dtype")
    ap.add_argument("--dry-run", action="store_true", help="print the storage needed and stop")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if not (args.checkpoint or args.random_init or args.dry_run):
        ap.error("give --checkpoint (or --random-init for a test run)")

    import torch

    from mmcap.config import get_preset
    from mmcap.data.features import cache_features, describe_storage
    from mmcap.data.indexed import CaptionDataset

    vision = get_preset(args.preset).vision
    dataset = CaptionDataset(args.dataset)
    if args.dry_run:
        print(describe_storage(len(dataset.images), vision, args.image_size))
        return 0
    from mmcap.model.vision import VisionTower, vision_from_hf

    tower = VisionTower(vision)
    if args.checkpoint:
        from mmcap.hf.io import read_state_dict

        tower.load_state_dict(vision_from_hf(read_state_dict(args.checkpoint), args.layout))
    tower.freeze()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    meta = cache_features(
        dataset,
        tower,
        vision,
        args.out,
        args.image_size,
        args.backend,
        args.batch_size,
        args.device,
        dtype,
        overwrite=args.overwrite,
    )
    print(json.dumps({k: v for k, v in meta.items() if k != "vision"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
