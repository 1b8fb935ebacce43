"""The LR range test behind `python -m snapens.lr_find`: it suggests scheduler.eta_max and eta_min.

Smith 2017 (Cyclical Learning Rates, arXiv 1506.01186, section 3.3): train a fresh model for a short while with the
learning rate growing exponentially from tiny to huge; the loss first stays flat, then falls, then explodes, and
the useful range lies where it falls. Each update is the one training makes (same model, data order, augmentation,
optimizer, clipping and precision; no torch.compile, whose first step would dwarf a short sweep). Only the curve is
kept: lr_find.json and lr_find.png in the run dir; the model's weights are thrown away."""

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import matplotlib
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from snapens.build import model_name, setup
from snapens.config import check_config
from snapens.batches import train_batches
from snapens.errors import SnapensError
from snapens.files import save_figure, write_atomic
from snapens.step import set_hyperparameters, train_step

matplotlib.use("Agg")  # files only: works on a headless machine
import matplotlib.pyplot as plt  # noqa: E402

SKIP_START = 0.1  # fraction of the planned steps the suggestion ignores, as fastai's lr_find does
RULE = ("eta_max: the lr where the smoothed loss falls fastest (most negative slope against log10 lr) between the "
        "first 10% of the steps and its minimum before the blow-up, at most a tenth of the lr where the loss blew up; "
        "alternative: the lr at the minimum / 10; eta_min: eta_max / 100")


def check_lr_find(c: DictConfig) -> None:
    """Raise SnapensError naming the first lr_find key whose value is out of range."""
    for ok, message in [(0 < c.start_lr < math.inf, f"lr_find.start_lr={c.start_lr} must be a finite number > 0"),
                        (0 < c.end_lr < math.inf, f"lr_find.end_lr={c.end_lr} must be a finite number > 0"),
                        (c.start_lr < c.end_lr, f"lr_find.start_lr={c.start_lr} must be below lr_find.end_lr="
                                                f"{c.end_lr}"),
                        (c.num_steps >= 2, f"lr_find.num_steps={c.num_steps} must be >= 2"),
                        (0 <= c.smoothing < 1, f"lr_find.smoothing={c.smoothing} must be >= 0 and < 1"),
                        (c.diverge_factor > 1, f"lr_find.diverge_factor={c.diverge_factor} must be > 1")]:
        if not ok:
            raise SnapensError(message)


def lr_at(step: int, start_lr: float, end_lr: float, num_steps: int) -> float:
    """Learning rate of update `step` (0-based): exponential, start_lr at step 0 and end_lr at num_steps - 1."""
    return start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))


def endless_batches(split, batch_size: int, generator: torch.Generator, augmentation, mean, std,
                    channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Epoch after epoch of training batches, drawn and laid out as snapens.train draws them."""
    while True:
        yield from train_batches(split, batch_size, generator, augmentation, mean, std, channels_last=channels_last)


def sweep(step: Callable, optimizer: torch.optim.Optimizer, batches: Iterator, lrs: list[float], smoothing: float,
          diverge_factor: float) -> dict:
    """One update per lr in `lrs` (step(x, y) -> loss tensor); stop once the loss diverges: the smoothed loss, or
    the raw loss of one update (the average lags many steps behind a blow-up), above diverge_factor times the best
    smoothed loss, or not finite. The smoothed loss is fastai's: an exponential moving average of the loss, divided
    by 1 - smoothing**(i+1) so that an average started at 0 is not too low over the first steps."""
    losses, smoothed, average, best = [], [], 0.0, math.inf
    for i, (lr, (x, y)) in enumerate(tqdm(zip(lrs, batches), total=len(lrs), unit="step", disable=None)):
        set_hyperparameters(optimizer, lr, None)  # momentum stays as the optimizer config says
        loss = float(step(x, y))  # read back at every step: the stop rule needs it
        average = smoothing * average + (1 - smoothing) * loss
        losses.append(loss)
        smoothed.append(average / (1 - smoothing ** (i + 1)))
        reason = diverged(loss, smoothed[-1], best, diverge_factor)
        if reason:
            return {"lrs": lrs[:i + 1], "losses": losses, "smoothed": smoothed, "stopped_early": True,
                    "stop_reason": f"at step {i} (lr {lr:.3g}) {reason}", "blowup_step": i}
        best = min(best, smoothed[-1])
    return {"lrs": lrs, "losses": losses, "smoothed": smoothed, "stopped_early": False, "stop_reason": None,
            "blowup_step": None}


def diverged(loss: float, smoothed: float, best: float, factor: float) -> str | None:
    """Why the sweep stops at this update, or None: the raw or smoothed loss not finite, or above factor x best."""
    for name, value in (("loss", loss), ("smoothed loss", smoothed)):
        if not math.isfinite(value):
            return f"the {name} is not finite"
        if value > factor * best:
            return f"the {name} {value:.4g} exceeded {factor:g} x the best smoothed loss {best:.4g}"
    return None


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 0, blowup: int | None = None) -> dict | None:
    """eta_max at the steepest descent of the smoothed loss before its minimum, and at most a tenth of the lr where
    the loss blew up (step `blowup`, when it did); None if it has no descent there. The slope is np.gradient against
    log10 lr (central differences, one-sided at the ends) over steps skip_start to the minimum, all before the
    blow-up: a drop after the loss has blown up is never chosen, nor one in the first steps, where the average holds
    a few batches and its noise looks like a slope (fastai skips the first 10% for this reason)."""
    loss = np.asarray(smoothed[:blowup], dtype=float)
    loss = loss[:len(loss) if np.isfinite(loss).all() else int(np.argmin(np.isfinite(loss)))]
    low = int(np.argmin(loss)) if len(loss) else 0
    if low - skip_start < 1:
        return None
    slope = np.gradient(loss[skip_start:low + 1], np.log10(lrs[skip_start:low + 1]))
    steep = skip_start + int(np.argmin(slope))
    eta_max = lrs[steep] if blowup is None else min(lrs[steep], lrs[blowup] / 10)
    return {"eta_max": eta_max, "eta_min": eta_max / 100, "steepest_step": steep,
            "slope_per_decade": float(slope[steep - skip_start]), "min_step": low, "lr_at_min": lrs[low],
            "lr_at_min_over_10": lrs[low] / 10}


def overrides_line(suggestion: dict, scheduler: DictConfig) -> str:
    """`scheduler.eta_max=X scheduler.eta_min=Y` at 2 significant digits, for the keys the scheduler has."""
    eta_max = float(f"{suggestion['eta_max']:.2g}")
    values = {"eta_max": eta_max, "eta_min": float(f"{eta_max / 100:.2g}")}
    return " ".join(f"scheduler.{k}={v:g}" for k, v in values.items() if k in scheduler)


def plot_curve(result: dict, path: Path) -> None:
    """Smoothed (and raw, faint) loss against lr on a log axis, with the suggestions marked."""
    lrs, s = result["lrs"], result["suggestion"]
    smoothed = np.where(np.isfinite(result["smoothed"]), result["smoothed"], np.nan)
    raw = np.where(np.isfinite(result["losses"]), result["losses"], np.nan)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, raw, color="0.6", lw=1, label="loss (each update)")
    ax.plot(lrs, smoothed, color="C0", label="smoothed loss")
    if s:
        ax.plot(s["eta_max"], smoothed[s["steepest_step"]], "o", color="C3",
                label=f"eta_max {s['eta_max']:.2g} (steepest descent)")
        ax.axvline(s["lr_at_min_over_10"], color="C2", ls=":", label=f"minimum / 10: {s['lr_at_min_over_10']:.2g}")
    if np.isfinite(smoothed).any():  # both curves in view, but for the raw loss's top 5% (its blow-up at the end)
        top = max(np.nanmax(smoothed), np.nanpercentile(raw, 95))
        ax.set_ylim(min(np.nanmin(smoothed), np.nanmin(raw)) * 0.95, top * 1.05)
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test (arXiv 1506.01186)")
    ax.legend()
    save_figure(fig, path)


def prepare(cfg: DictConfig) -> tuple[Callable, torch.optim.Optimizer, Iterator, str]:
    """The update, optimizer and batches as snapens.train builds them (snapens.build.setup), and a one-line setting."""
    s = setup(cfg)
    options = dataclasses.replace(s.step_options, skip_nonfinite=False)  # a diverging loss ends the sweep instead
    batches = endless_batches(s.train_split, s.update_size, s.generator, s.augmentation, s.data.mean, s.data.std,
                              cfg.trainer.channels_last)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return train_step(s.model, s.optimizer, x, y, options).loss

    return step, s.optimizer, batches, (f"{model_name(cfg.model)} on {cfg.data.name} ({len(s.data.train)} images), "
                                        f"{cfg.optimizer.name}, batch {s.update_size}, on {s.device}")


def find_lr(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the range test as `cfg` (conf/lr_find.yaml) says; write lr_find.json and lr_find.png into run_dir."""
    check_config(cfg)
    sweep_cfg, run_dir = cfg.lr_find, Path(run_dir)
    check_lr_find(sweep_cfg)
    if (run_dir / "lr_find.json").exists():
        raise SnapensError(f"{run_dir} already holds lr_find.json; pass a new hydra.run.dir=DIR (nothing was changed)")
    step, optimizer, batches, setting = prepare(cfg)
    lrs = [lr_at(i, sweep_cfg.start_lr, sweep_cfg.end_lr, sweep_cfg.num_steps) for i in range(sweep_cfg.num_steps)]
    result = sweep(step, optimizer, batches, lrs, sweep_cfg.smoothing, sweep_cfg.diverge_factor)
    result["suggestion"] = suggest(result["lrs"], result["smoothed"], int(SKIP_START * sweep_cfg.num_steps),
                                   result["blowup_step"])
    result.update(rule=RULE, setting=setting, config={
        k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("data", "model", "optimizer", "trainer", "lr_find")},
                  overrides=result["suggestion"] and overrides_line(result["suggestion"], cfg.scheduler))
    if HydraConfig.initialized():
        result["config"]["command_line"] = list(HydraConfig.get().overrides.task)
    write_results(result, run_dir)
    if result["suggestion"] is None:
        raise SnapensError(f"the smoothed loss does not fall before its minimum, so there is nothing to suggest (see "
                           f"{run_dir}/lr_find.png); lower lr_find.start_lr or raise lr_find.num_steps")
    return result


def write_results(result: dict, run_dir: Path) -> None:
    """lr_find.json (a non-finite loss as null: JSON has no NaN or Infinity) and lr_find.png."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**result, **{k: [v if math.isfinite(v) else None for v in result[k]] for k in ("losses", "smoothed")}}
    write_atomic(run_dir / "lr_find.json", (json.dumps(record, indent=1) + "\n").encode())
    plot_curve(result, run_dir / "lr_find.png")


def summary(result: dict, run_dir: str | Path) -> str:
    """What the test found, the rule, and the overrides to paste (the last line)."""
    s, n = result["suggestion"], result["config"]["lr_find"]["num_steps"]
    return "\n".join([
        f"LR range test (arXiv 1506.01186): {result['setting']}; {len(result['lrs'])} of {n} steps"
        + (f", stopped early: {result['stop_reason']}" if result["stopped_early"] else ""),
        f"steepest descent of the smoothed loss at lr {s['eta_max']:.3g} (step {s['steepest_step']}); "
        f"minimum at lr {s['lr_at_min']:.3g} (step {s['min_step']}), / 10 = {s['lr_at_min_over_10']:.3g}",
        f"rule: {RULE}",
        *([] if result["stopped_early"] else [
            f"warning: the loss never diverged up to lr_find.end_lr={result['lrs'][-1]:g}, so the blow-up that "
            "bounds the useful range was not seen" + (" and the minimum is only where the sweep ended" if
                                                       s["min_step"] == len(result["lrs"]) - 1 else "")
            + f"; run again with lr_find.end_lr={10 * result['lrs'][-1]:g}"]),
        f"wrote {Path(run_dir) / 'lr_find.json'} and lr_find.png; overrides to paste:",
        result["overrides"]])
