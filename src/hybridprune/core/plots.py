"""PNG pictures a person would rather look at than read: sparsity by layer, tier maps."""
from __future__ import annotations

import math
from pathlib import Path

from hybridprune.core.errors import require

matplotlib = require("matplotlib", "plots", "drawing PNG pictures")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TIER_COLORS = ("#1b7837", "#f1a340", "#b2182b")  # dense, N:M, top-k


def plot_layer_sparsity(report: dict, tier_maps: dict, path: Path) -> Path:
    """Per-layer sparsity; for tiered models a stacked bar of the share of blocks in each tier."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = report["layers"]
    xs = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.35), 4))
    if tier_maps:
        shares = []
        for layer in layers:
            maps = [t for n, t in tier_maps.items() if n.startswith(layer["layer"] + ".")]
            total = sum(t.numel() for t in maps) or 1
            shares.append([sum(int((t == k).sum()) for t in maps) / total for k in range(3)])
        bottom = [0.0] * len(layers)
        for k, name in enumerate(("dense blocks", "N:M blocks", "top-k blocks")):
            vals = [s[k] for s in shares]
            ax.bar(xs, vals, bottom=bottom, color=TIER_COLORS[k], label=name, width=0.8)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot(xs, [layer["sparsity"] for layer in layers], "k.-", label="weight sparsity")
        ax.set_ylabel("share of blocks / sparsity")
    else:
        ax.bar(xs, [layer["sparsity"] for layer in layers], color="#4575b4", label="weight sparsity")
        ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Sparsity by layer (overall {report['overall']:.3f})")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tier_maps(tier_maps: dict, path: Path) -> Path:
    """One panel per matrix: each pixel is a block, coloured by its tier (rows = outputs, columns = inputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(tier_maps)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    cmap = ListedColormap(TIER_COLORS)
    for ax, (name, tiers) in zip(axes.flat, tier_maps.items()):
        ax.imshow(tiers.numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        share = [int((tiers == k).sum()) / tiers.numel() for k in range(3)]
        ax.set_title(f"{name.split('.', 2)[-1]}\n" + ", ".join(f"{t} {s:.0%}" for t, s in zip(("dense", "N:M", "top-k"),
                                                                                          share)), fontsize=8)
        ax.set_xlabel("input blocks", fontsize=7)
        ax.set_ylabel("output blocks", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in TIER_COLORS]
    fig.legend(handles, ["dense", "N:M", "top-k"], loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(models: list[str], keys: list[tuple[str, str]], table: list[dict], path: Path) -> Path:
    """Grouped bars: one group per (task, metric), one bar per model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4, 2.6 * len(keys)), 3.6), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        vals = [row.get(key, float("nan")) for row in table]
        ax.bar(range(len(models)), vals, color=["#4575b4", "#d73027", "#1a9850", "#fdae61"][: len(models)] * 4)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{key[0]}\n{key[1]}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(losses: list[tuple[int, float]], path: Path) -> Path:
    """Training loss by step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], ".-", color="#4575b4")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Fine-tuning loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
