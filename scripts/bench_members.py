"""Choosing members at scale: last m, greedy (Caruana), the growing-ensemble curves, the disagreement matrix and the
whole choice on validation (`selection.choose`) for M = 100 members on 10,000 images of 10 classes, each timed;
and, at a size where it finishes, last m and greedy against their definitions (every candidate ensemble scored on
its own, as snapens did before it kept running sums: O(M^2 N C) and O(M^3 N C)), with their ratio.

    python scripts/bench_members.py [--members 100] [--images 10000]     # CPU, about a minute
"""

import argparse
import time

import torch

from snapens.ensemble import metrics, selection


def members(m: int, n: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """M x N x C logits of members that grow stronger (as snapshots do), and N labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    strength = torch.linspace(0.5, 3, m, dtype=torch.float64).view(-1, 1, 1)
    noise = torch.randn(m, n, classes, generator=g, dtype=torch.float64)
    return (noise + strength * torch.nn.functional.one_hot(labels, classes)).float(), labels


def seconds(work) -> tuple[float, object]:
    start = time.perf_counter()
    out = work()
    return time.perf_counter() - start, out


def by_definition(logits: torch.Tensor, labels: torch.Tensor, rule: str = "logits") -> tuple[list, list]:
    """last m and greedy as their docstrings define them, each candidate ensemble scored on its own."""
    total = len(logits)
    m = min(range(1, total + 1), key=lambda k: (selection.criterion(logits[total - k:], labels, rule), k))
    chosen, best = [], float("inf")
    for _ in range(2 * total):
        value, pick = min((selection.criterion(logits[chosen + [i]], labels, rule), i) for i in range(total))
        if value >= best:
            break
        chosen, best = chosen + [pick], value
    return list(range(total - m, total)), chosen or [total - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--compare-members", type=int, default=12, help="M for the comparison with the definitions")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    logits, labels = members(args.members, args.images)
    half = args.images // 2
    names = [f"c{i}" for i in range(args.members)]
    for name, work in [("last m", lambda: selection.last_m(logits, labels, "logits")),
                       ("greedy", lambda: selection.greedy(logits, labels, "logits")),
                       ("curves (3 rules, first and last m)", lambda: metrics.curves(logits, labels)),
                       ("disagreement", lambda: metrics.disagreement(logits)),
                       ("choose (last m, greedy, weights, temperatures)",
                        lambda: selection.choose(logits[:, :half], labels[:half], logits[:, half:], labels[half:],
                                                 names))]:
        took, out = seconds(work)
        picks = f", {len(out)} picks" if name == "greedy" else ""
        print(f"M={args.members}, N={args.images}: {name}: {took:.2f} s{picks}")
    small, small_labels = members(args.compare_members, args.images)
    fast, picks = seconds(lambda: (selection.last_m(small, small_labels, "logits"),
                                   selection.greedy(small, small_labels, "logits")))
    slow, defined = seconds(lambda: by_definition(small, small_labels))
    print(f"M={args.compare_members}, N={args.images}: last m and greedy {fast:.4f} s, by their definitions "
          f"{slow:.4f} s, ratio {slow / fast:.2f}x; the same members: {picks == defined}")


if __name__ == "__main__":
    main()
