"""`Ensemble`: some members, a rule, weights and a temperature, as one torch module (plain torch, no Hydra).

    ensemble = snapens.Ensemble.from_run("outputs/runs/.../", chosen="greedy")   # what training chose on validation
    probs = ensemble.probs(images)               # uint8 N x 3 x H x W -> float32 N x C, what predict= writes
    ensemble.export("ensemble.pt2")              # the same as one file that needs only torch to load

It takes what a camera or a file gives, uint8 images, normalises them with the training statistics, runs every
member (eval mode: BatchNorm's running statistics) and combines them with `snapens.ensemble.rules` (the rule, the
members' weights, and the temperature fitted on validation, which scales the pooled distribution). `logits` gives
the members' M x N x C logits, `member_logits` the same for inputs already normalised (a distillation teacher's
batches). `export` traces the module with `torch.export` for any batch size: `torch.export.load(path).module()(
images)` runs it anywhere torch runs, without snapens.
"""

from pathlib import Path

import torch

from snapens.batches import normalize
from snapens.images import read_images
from snapens.ensemble import members as found, rules
from snapens.ensemble.batched import StackedMembers, same_architecture
from snapens.errors import SnapensError
from snapens.files import partial_name, write_atomic
from snapens.models import model_from_metadata
from snapens.precision import autocast, layout
from snapens.snapshots import load_into


class Ensemble(torch.nn.Module):
    """uint8 images -> the ensemble's probabilities (see the module's docstring).

    Args:
        models: the M members (one instance per distinct member; weights say how much each counts).
        mean, std: the training statistics the members were trained on (per channel, of images in [0, 1]).
        rule, weights, temperature: see `snapens.ensemble.rules`; weights None: uniform; temperature None: unscaled.
        classes, image_size: the class names and the (H, W) the members were trained on, kept for predict/export.
        batched: run members of one architecture in one vmapped pass (snapens.ensemble.batched).
        precision: the autocast dtype of the members' forward passes (None: fp32).
    """

    def __init__(self, models: list[torch.nn.Module], mean, std, rule: str = "logits",
                 weights: torch.Tensor | None = None, temperature: float | None = None, *,
                 classes: list[str] | None = None, image_size: tuple[int, int] | None = None,
                 batched: bool = False, precision: torch.dtype | None = None):
        super().__init__()
        rules.check_rule(rule)
        weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        rules.check_weights(weights, len(models))
        rules.check_temperature(temperature)
        if temperature is not None and not rules.gives_probabilities(rule):
            raise ValueError("a vote has no temperature: its probabilities are vote fractions")
        if batched and not same_architecture(models):
            raise ValueError("batched=True needs members of one architecture")
        self.members = torch.nn.ModuleList(models).eval()
        self.register_buffer("weights", None if weights is None else weights.to(torch.float32))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.rule, self.temperature, self.precision = rule, temperature, precision
        self.classes, self.image_size = classes, None if image_size is None else tuple(image_size)
        self.stacked = StackedMembers(list(self.members)) if batched else None  # build on the members' device
        self.source = "given"  # where the members, weights and temperature came from (from_run says)

    @classmethod
    def from_files(cls, paths: list[Path], rule: str = "logits", weights: torch.Tensor | None = None,
                   temperature: float | None = None, device: str | torch.device = "cpu", channels_last: bool = False,
                   **options) -> "Ensemble":
        """The snapshots at `paths` (written by snapens.train: one class list, one kind of input), each rebuilt
        through the models' allow-list and put on `device` in the given layout; a file named twice counts as often
        (its weights are added)."""
        unique, summed = found.distinct({"members": [Path(p) for p in paths], "weights": weights})
        metas = found.read(unique)
        found.check_same_classes(unique, metas)
        found.check_same_inputs(unique, metas)
        models = []
        for path, meta in zip(unique, metas):
            model = model_from_metadata(meta["model_config"], f"snapshot {path}")
            load_into(model, path)
            models.append(model.to(device, memory_format=layout(channels_last)))
        uniform = weights is None and len(unique) == len(paths)
        ensemble = cls(models, metas[0]["mean"], metas[0]["std"], rule, None if uniform else summed, temperature,
                       classes=metas[0]["classes"], image_size=tuple(metas[0]["image_size"]), **options)
        return ensemble.to(device)  # the normalisation's statistics beside the members

    @classmethod
    def from_run(cls, run: str | Path, members="all", chosen: str | None = None, swa: bool = False,
                 rule: str = "logits", calibrate: str = "val", **options) -> "Ensemble":
        """A run dir's ensemble: its snapshots after `members` (all | last:K | first:K | [cycles]), or with `chosen`
        (last_m | greedy | weighted) the members and weights training chose on validation; with calibrate="val",
        the temperature fitted on validation for exactly these members and rule, when one is stored."""
        found.check_chosen(chosen, run, members, swa)
        paths = found.select(found.run_snapshots(Path(run), swa), members)
        how = found.combination(paths, run, rule, calibrate, chosen)
        ensemble = cls.from_files(how["members"], rule, how["weights"], how["temperature"], **options)
        ensemble.source = how["source"]
        return ensemble

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 M x N x C logits of the members on normalised float inputs N x 3 x H x W."""
        with autocast(x.device, self.precision):
            if self.stacked is not None:
                return self.stacked(x).float()
            return torch.stack([member(x) for member in self.members]).float()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 M x N x C logits of the members on uint8 images N x 3 x H x W."""
        return self.member_logits(normalize(images, self.mean, self.std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float32 N x C probabilities of uint8 images N x 3 x H x W (`rules.distribution`: the arguments were
        checked when the ensemble was built, so the module traces without data-dependent branches)."""
        return rules.distribution(self.logits(images), self.rule, self.weights, self.temperature).float()

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.eval()(images)

    @torch.no_grad()
    def predictions(self, images: torch.Tensor) -> torch.Tensor:
        """int64 N classes: the rule's prediction (`rules.predictions`, a vote's tie-break included)."""
        return rules.predictions(self.eval().logits(images), self.rule, self.weights)

    def read_images(self, files: list[Path]) -> torch.Tensor:
        """uint8 N x 3 x H x W: the image files read as the training data was (RGB), resized to the members'
        image size when they differ."""
        return read_images(files, self.image_size)

    def export(self, path: Path, extra_files: dict[str, str] | None = None) -> torch.export.ExportedProgram:
        """This ensemble as an ExportedProgram for uint8 batches of any size, saved to `path` (a .pt2, written whole
        or not at all) with `extra_files` (name -> text, read back by torch.export.load's extra_files)."""
        if not rules.gives_probabilities(self.rule):
            raise ValueError(f"rule={self.rule!r}: an exported ensemble returns probabilities; use logits or probs")
        if self.stacked is not None or self.image_size is None:
            raise ValueError("export needs the members' image_size, and runs them one after another (batched=False)")
        example = torch.zeros(2, 3, *self.image_size, dtype=torch.uint8)
        program = torch.export.export(self.eval(), (example,),
                                      dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(path, ".pt2")  # torch.export.save wants the .pt2 suffix
        try:
            torch.export.save(program, tmp, extra_files=extra_files)
            write_atomic(path, tmp.read_bytes())
        except OSError as e:  # a full disk, a vanished folder: as write_atomic says it
            raise SnapensError(f"cannot write {path}: {e.strerror or e}; the earlier file under that name is intact "
                               "(free some space, or fix the folder's permissions, and run it again)") from None
        finally:  # a full disk or a stop signal leaves no partial file (a kill -9's is swept by the next export)
            tmp.unlink(missing_ok=True)
        return program
