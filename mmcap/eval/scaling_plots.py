"""Figures of the fitted scaling laws (as the paper's Figure 4): CE against P, S and T per
split with the fitted curve (the other regressors at their median), and CE against compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmcap.eval.scaling_law import PowerLawFit, Run, fill_initial_loss


def plot_fits(
    runs: list[Run],
    laws: dict[str, PowerLawFit],
    compute: dict[str, PowerLawFit],
    out_dir: str | Path,
) -> list[Path]:
    """Write ``scaling_law.png`` (and ``compute_law.png`` with C); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = fill_initial_loss(runs)
    splits = sorted(laws)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), squeeze=False)
    for ax, name in zip(axes[0], ("P", "S", "T"), strict=True):
        for i, split in enumerate(splits):
            rs = [r for r in runs if r.split == split]
            x = np.array([getattr(r, name) for r in rs])
            ax.scatter(x, [r.loss for r in rs], color=f"C{i}", s=14, label=split)
            fixed = {k: float(np.median([getattr(r, k) for r in rs])) for k in "PST" if k != name}
            grid = np.geomspace(x.min(), x.max(), 50) if x.min() > 0 else x
            ax.plot(grid, [laws[split].predict(**fixed, **{name: g}) for g in grid], color=f"C{i}")
        ax.set(xscale="log", yscale="log", xlabel=name, ylabel="CE")
    axes[0][0].legend()
    fig.tight_layout()
    paths = [out_dir / "scaling_law.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    if compute:
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for i, split in enumerate(sorted(compute)):
            rs = [r for r in runs if r.split == split]
            c = np.array([r.C for r in rs])
            ax.scatter(c, [r.loss for r in rs], color=f"C{i}", s=14, label=split)
            grid = np.geomspace(c.min(), c.max(), 50)
            ax.plot(grid, [compute[split].predict(C=g) for g in grid], color=f"C{i}")
        ax.set(xscale="log", yscale="log", xlabel="C (MACs)", ylabel="CE")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "compute_law.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
