"""Temperature scaling fitted on the validation split (Guo et al. 2017, arXiv 1706.04599, section 4.2).

One number T > 0 divides the log-probabilities before the softmax: p_T = softmax(log p / T). It changes no
prediction (the argmax stays), only the confidence, and is fitted by minimising the validation NLL. For one model,
and for an ensemble that averages logits, log p is the (mean) logits up to a constant per image, so this is Guo et
al.'s softmax(z / T) exactly; for an ensemble that averages probabilities it scales the pooled prediction ("pool,
then calibrate", Ashukha et al. 2020, arXiv 2002.06470, section 4). A vote has zero probabilities and no
temperature.

The temperature is fitted on validation images only: `calibrate` takes the validation split to fit and only then
scores the test split, before and after, so a test number is never tuned on the test set.

When every validation image is classified right, the validation NLL falls without end as T -> 0, so no T minimises
it: an optimiser stops at some tiny T, every test prediction becomes certain, and the test ECE becomes exactly
1 - accuracy (how a run's ensemble went from 5.4% to 13.5% test ECE, issue 26; tests/test_calibration.py rebuilds
it). No temperature is fitted then (T = None, said in the record); with only a few validation errors T rests on
those few images, and a fitted T that raises the test ECE (it minimises the NLL, not the ECE) is said too.
"""

import torch

from snapens.ensemble import metrics, rules
from snapens.ensemble.rules import TINY, scale  # noqa: F401  (scale: the one temperature formula)


FEW_ERRORS = 10  # validation errors below which the fitted T is said to rest on a handful of images


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float | None:
    """The T > 0 minimising the NLL of `scale(probs, T)` on these (validation) labels: L-BFGS on log T from T = 1.
    Deterministic on the same inputs. None when every prediction is right: no T minimises the NLL then."""
    if bool((probs.argmax(1) == labels).all()):
        return None
    log_p = probs.double().clamp_min(TINY).log()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(log_p / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.exp().item()


def _scores(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> dict:
    """NLL and ECE (accuracy does not change with T, so it is left out)."""
    scores = metrics.probability_scores(probs, labels, bins)
    return {"nll": scores["nll"], "ece": scores["ece"]}


def calibrate(val_probs: torch.Tensor, val_labels: torch.Tensor, test_probs: torch.Tensor, test_labels: torch.Tensor,
              bins: int = 15) -> dict:
    """The temperature fitted on validation, then NLL and ECE before and after it on both splits, and what a reader
    should know about the fit: {"temperature" (None: not fitted), "val": {"before": {nll, ece}, "after": ...},
    "test": {...}, "warnings": [sentences]}."""
    temperature = fit_temperature(val_probs, val_labels)
    out = {"temperature": temperature,
           **{name: {"before": _scores(p, y, bins), "after": _scores(scale(p, temperature) if temperature else p, y,
                                                                    bins)}
              for name, p, y in (("val", val_probs, val_labels), ("test", test_probs, test_labels))}}
    return {**out, "warnings": warnings(out, int((val_probs.argmax(1) != val_labels).sum()), len(val_labels))}


def warnings(fitted: dict, errors: int, images: int) -> list[str]:
    """The fit's caveats, from its own numbers."""
    if fitted["temperature"] is None:
        return [f"no temperature fitted: all {images} validation images are classified right, so the validation NLL "
                "falls without end as T -> 0 (hold out more images with data.val_size=N)"]
    said = []
    if errors < FEW_ERRORS:
        said.append(f"T = {fitted['temperature']:.3g} rests on the {errors} misclassified validation image"
                    f"{'s' if errors > 1 else ''} of {images}: hold out more images for a steadier fit")
    test = fitted["test"]
    if test["after"]["ece"] > test["before"]["ece"]:
        said.append(f"T = {fitted['temperature']:.3g} lowered the validation NLL but raised the test ECE "
                    f"({test['before']['ece']:.4f} -> {test['after']['ece']:.4f}): it minimises the NLL, not the ECE")
    return said


def calibrate_run(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor,
                  test_labels: torch.Tensor, rule: str, bins: int = 15) -> dict | None:
    """results.json's and ensemble.json's "calibration": `calibrate` for the last snapshot ("single") and the
    ensemble of all members under `rule`, from M x N x C logits of both splits; None for a vote."""
    if not rules.gives_probabilities(rule):
        return None
    models = {"single": lambda logits: metrics.probabilities(logits[-1:]),
              "ensemble": lambda logits: metrics.probabilities(logits, rule)}
    return {"fitted_on": "val", **{name: calibrate(probs(val_logits), val_labels, probs(test_logits), test_labels, bins)
                                   for name, probs in models.items()}}


def format_calibration(calibration: dict) -> str:
    """One line per model: its temperature and the test NLL and ECE before and after."""
    lines = []
    for name, label in (("single", "last snapshot"), ("ensemble", "ensemble")):
        c = calibration[name]
        before, after = c["test"]["before"], c["test"]["after"]
        if c["temperature"] is not None:
            lines.append(f"temperature fitted on validation, {label}: T = {c['temperature']:.3f}: test NLL "
                         f"{before['nll']:.4f} -> {after['nll']:.4f}, ECE {before['ece']:.4f} -> {after['ece']:.4f}")
        lines += [f"temperature scaling, {label}: {w}" for w in c.get("warnings", [])]
    return "\n".join(lines)
