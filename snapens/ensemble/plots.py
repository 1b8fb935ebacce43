"""The ensemble report's figures as PNG files (matplotlib, no display needed)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless machine
import matplotlib.pyplot as plt  # noqa: E402

from snapens.files import save_figure  # noqa: E402


def plot_accuracy_vs_members(curves: dict, single_acc: float, rule: str, path: Path, source: str = "") -> None:
    """Accuracy of the ensemble of the last m and of the first m snapshots against m, with the last snapshot's line
    (Huang et al. 2017, arXiv 1704.00109, figure 3: later snapshots are better alone, earlier ones add diversity)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for end, style in (("last", "o-"), ("first", "s--")):
        points = curves[end][rule]
        ax.plot([p["m"] for p in points], [p["acc"] for p in points], style, label=f"{end} m snapshots")
    ax.axhline(single_acc, color="gray", lw=1, label="last snapshot alone")
    ax.set(xlabel="ensemble size m", ylabel="accuracy", title=titled(f"ensemble accuracy ({rule})", source))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    save_figure(fig, path)


def plot_disagreement(matrix, names: list[str], path: Path, source: str = "") -> None:
    """Heatmap of the fraction of points on which two snapshots' predictions differ, each cell's value written in
    it (up to 12 snapshots; beyond, the colours alone), the cells large enough for their labels."""
    n = len(names)
    side = 2.5 + 0.75 * n
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(matrix, cmap="viridis", vmin=0)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    if n <= 12:
        top = max((v for row in matrix for v in row), default=0) or 1
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):  # dark text on the light end of viridis, light on the dark end
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if value > 0.6 * top else "white")
    fig.colorbar(image, ax=ax, label="disagreement", fraction=0.046, pad=0.04)
    ax.set_title(titled("pairwise disagreement", source))
    save_figure(fig, path)


def plot_reliability(diagrams: dict[str, dict], path: Path, source: str = "") -> None:
    """Reliability diagrams (Guo et al. 2017, arXiv 1706.04599): accuracy against confidence per bin, labelled as
    `diagrams` names them (the caller gives each model's ECE there), and below, how many images each bin holds (a
    point of a thin bin says little)."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(4.5, 6), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="gray", lw=1, label="perfect calibration")
    width = 1 / len(next(iter(diagrams.values()))["count"]) / (len(diagrams) + 1)
    for k, (label, d) in enumerate(diagrams.items()):
        filled = [i for i, c in enumerate(d["count"]) if c]
        ax.plot([d["confidence"][i] for i in filled], [d["accuracy"][i] for i in filled], "o-", label=label)
        counts.bar([lo + (k + 0.5) * width for lo in d["lower"]], d["count"], width=width, align="edge",
                   color=f"C{k}")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=titled("reliability", source))
    counts.set(xlabel="confidence", ylabel="images per bin", yscale="symlog")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def titled(title: str, source: str) -> str:
    """A figure's title with the run (or runs) it was drawn from, so a copied PNG still says whose it is."""
    return f"{title}\n{source}" if source else title
