"""A whole ensemble as one module, and as one file that needs only torch to load (`torch.export`, a .pt2).

`EnsembleModule` takes what a camera or a file gives, uint8 N x 3 x H x W images, and returns float32 N x C class
probabilities: the training statistics' normalisation, every member's forward pass (eval mode: BatchNorm's running
statistics), the combining rule with the members' weights (uniform, or chosen on validation), and optionally the
temperature fitted on validation (snapens.ensemble.calibration). `export` traces it with `torch.export` for any
batch size and saves the ExportedProgram; `torch.export.load(path).module()(images)` runs it anywhere torch runs,
without snapens.
"""

from pathlib import Path

import torch

from snapens.files import write_atomic


class EnsembleModule(torch.nn.Module):
    """uint8 images -> probabilities of the ensemble of `models` (see the module's docstring)."""

    def __init__(self, models: list[torch.nn.Module], mean, std, rule: str = "logits",
                 weights: torch.Tensor | None = None, temperature: float | None = None):
        super().__init__()
        if rule not in ("logits", "probs"):
            raise ValueError(f"rule={rule!r}: an exported ensemble returns probabilities; use logits or probs")
        self.members = torch.nn.ModuleList(models).eval()
        weights = torch.full((len(models),), 1 / len(models)) if weights is None else weights
        self.register_buffer("weights", weights.to(torch.float32).view(-1, 1, 1))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.rule, self.temperature = rule, temperature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) / 255 - self.mean) / self.std
        logits = torch.stack([member(x) for member in self.members])  # M x N x C
        if self.rule == "logits":
            scores = (self.weights * logits).sum(0)  # log-probabilities up to a constant per image
        else:
            scores = (self.weights * logits.softmax(-1)).sum(0).clamp_min(1e-30).log()
        return (scores / (self.temperature or 1.0)).softmax(-1)


def export(module: EnsembleModule, image_size: tuple[int, int], path: Path,
           extra_files: dict[str, str] | None = None) -> torch.export.ExportedProgram:
    """`module` as an ExportedProgram for uint8 batches of any size of `image_size`, saved to `path` (written whole
    or not at all) with `extra_files` (name -> text, read back by torch.export.load's extra_files)."""
    example = torch.zeros(2, 3, *image_size, dtype=torch.uint8)
    program = torch.export.export(module.eval(), (example,),
                                  dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.pt2")  # torch.export.save wants the .pt2 suffix
    torch.export.save(program, tmp, extra_files=extra_files)
    write_atomic(path, tmp.read_bytes())
    tmp.unlink()
    return program
