"""Tests for snapens.models: parameter counts derived from the layer shapes, output shapes, depth checks, configs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import hydra.utils
import pytest
import torch
from snapens.errors import SnapensError
from snapens.models import CifarResNet, WideResNet, model_from_metadata
from snapens.training import train
from torch import nn

from conftest import EQUAL_CYCLES_2, HANG, says

MODEL_CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "model").glob("*.yaml"))
LIBRARIES = ("timm", "torchvision")  # conf/model/'s models by name (tested below the CIFAR families)
CIFAR_CONFIGS = [name for name in MODEL_CONFIGS if name not in LIBRARIES]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(c_in: int, c_out: int, k: int = 3) -> int:
    return c_in * c_out * k * k  # bias-free


def bn(c: int) -> int:
    return 2 * c  # weight and bias (running stats are buffers)


def fc(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


def resnet_params(depth: int, num_classes: int) -> int:
    """He et al. 2016: stem conv-BN, 3 stages of n blocks (conv-BN-conv-BN), option-A shortcuts (no weights)."""
    n = (depth - 2) // 6
    total, c_in = conv(3, 16) + bn(16), 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(c_in, width) + bn(width) + conv(width, width) + bn(width)
            c_in = width
    return total + fc(64, num_classes)


def wrn_params(depth: int, k: int, num_classes: int) -> int:
    """Zagoruyko & Komodakis 2016: pre-activation blocks (BN-conv-BN-conv), 1x1 projection where the shape changes."""
    n = (depth - 4) // 6
    total, c_in = conv(3, 16), 16
    for width in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            shortcut = conv(c_in, width, 1) if c_in != width else 0  # stages 2, 3 open with a width change
            total += bn(c_in) + conv(c_in, width) + bn(width) + conv(width, width) + shortcut
            c_in = width
    return total + bn(c_in) + fc(c_in, num_classes)


def test_resnet20_formula_gives_the_published_count():
    """The layer-shape formula gives ResNet-20 with 10 classes 269,722 parameters (the paper's 0.27M)."""
    assert resnet_params(20, 10) == 269_722


@pytest.mark.parametrize("depth, num_classes, paper, digits", [
    (20, 10, 0.27, 2), (32, 10, 0.46, 2), (44, 10, 0.66, 2), (56, 10, 0.85, 2), (110, 10, 1.7, 1),
    (8, 100, None, 0), (20, 100, None, 0),
])
def test_resnet_parameter_count(depth, num_classes, paper, digits):
    """CifarResNet has exactly the formula's parameters, matching the paper's millions (arXiv 1512.03385, Table 6)."""
    n = count(CifarResNet(depth, num_classes))
    assert n == resnet_params(depth, num_classes)
    if paper is not None:
        assert round(n / 1e6, digits) == paper


@pytest.mark.parametrize("depth, k, num_classes, paper", [
    (28, 10, 10, 36.5), (16, 4, 10, 2.7), (10, 1, 10, None), (16, 2, 100, None), (22, 1, 7, None),
])
def test_wrn_parameter_count(depth, k, num_classes, paper):
    """WideResNet has exactly the formula's parameters; WRN-28-10 36.5M and WRN-16-4 2.7M (arXiv 1605.07146)."""
    n = count(WideResNet(depth, k, num_classes=num_classes))
    assert n == wrn_params(depth, k, num_classes)
    if paper is not None:
        assert round(n / 1e6, 1) == paper


@pytest.mark.parametrize("make, num_classes, size", [
    (lambda c: CifarResNet(8, c), 7, 32),
    (lambda c: CifarResNet(20, c), 10, 32),
    (lambda c: CifarResNet(8, c), 3, 24),  # the head pools globally, so other sizes work
    (lambda c: WideResNet(10, 2, dropout=0.3, num_classes=c), 5, 32),
    (lambda c: WideResNet(16, 1, num_classes=c), 100, 32),
], ids=["resnet8", "resnet20", "resnet8-24px", "wrn10_2", "wrn16_1"])
def test_output_shape(make, num_classes, size):
    """A batch of B images gives B x num_classes finite logits."""
    model = make(num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (3, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("make, width", [(lambda: CifarResNet(8), 64), (lambda: WideResNet(10, 2), 128)],
                         ids=["resnet8", "wrn10_2"])
def test_stages_halve_the_maps_twice(make, width):
    """32x32 inputs reach the head as 8x8 maps of the last stage's width (stride 2 opens stages 2 and 3)."""
    model, seen = make(), []
    model.blocks.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        model.eval()(torch.zeros(2, 3, 32, 32))
    assert seen == [(2, width, 8, 8)]


@pytest.mark.parametrize("cls, depth, rule", [
    (CifarResNet, 21, "6n+2"), (CifarResNet, 18, "6n+2"), (CifarResNet, 2, "6n+2"), (CifarResNet, 0, "6n+2"),
    (WideResNet, 27, "6n+4"), (WideResNet, 29, "6n+4"), (WideResNet, 4, "6n+4"),
])
def test_invalid_depth_is_rejected(cls, depth, rule):
    """A depth that is not 6n+2 (ResNet) or 6n+4 (WRN) with n >= 1 is a ValueError naming the rule and the value."""
    with pytest.raises(ValueError, match=rule.replace("+", r"\+")) as info:
        cls(depth=depth)
    assert f"got {depth}" in str(info.value)


def test_model_config_group_is_complete():
    """conf/model/ holds the models DESIGN.md lists, and any torchvision or timm model by name."""
    assert CIFAR_CONFIGS == sorted(["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "wrn16_4", "wrn28_10"])
    assert set(MODEL_CONFIGS) - set(CIFAR_CONFIGS) == set(LIBRARIES)


@pytest.mark.parametrize("data, num_classes", [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("name", CIFAR_CONFIGS)
def test_model_config_instantiates(make_cfg, name, data, num_classes):
    """Every model yaml composes and instantiates to the model it describes, with one output per data class."""
    cfg = make_cfg(f"model={name}", f"data={data}")
    assert cfg.data.num_classes == num_classes
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, nn.Module)
    if isinstance(model, WideResNet):
        expected = wrn_params(cfg.model.depth, cfg.model.widen_factor, num_classes)
    else:
        expected = resnet_params(cfg.model.depth, num_classes)
    assert count(model) == expected
    if name == "wrn28_10":  # 36.5M parameters: too slow to run here
        assert model.fc.out_features == num_classes
        return
    with torch.no_grad():  # 8x8 inputs keep ResNet-110 cheap; 32x32 shapes are checked in test_output_shape
        assert model.eval()(torch.zeros(2, 3, 8, 8)).shape == (2, num_classes)


# ---- 6. model configs read from files are bounded -----------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"depth": 28, "widen_factor": -1}, "model.widen_factor must be between 1 and 32"),
    ({"depth": 28, "widen_factor": 4, "dropout": float("nan")}, "model.dropout must be a probability in [0, 1)"),
    ({"depth": 600004, "widen_factor": 1}, "model.depth must be 6n+4 between 10 and 1000"),
    ({"_target_": "snapens.models.CifarResNet", "depth": 20, "num_classes": 10**13},
     "model.num_classes must be between 1 and 100,000"),
    ({"_target_": "snapens.models.CifarResNet", "depth": 600002}, "model.depth must be 6n+2 between 8 and 1202"),
    ({"depth": 76, "widen_factor": 32}, "names a model of 1,166,029,274 parameters"),  # counted on the meta device, never allocated
])
def test_tampered_model_metadata_is_refused_before_anything_is_built(config, message):
    config = {"_target_": "snapens.models.WideResNet", "num_classes": 10, **config}
    with pytest.raises(SnapensError, match=re.escape(f"snapshot x{'' if 'names' in message else ':'} {message}")):
        model_from_metadata(config, "snapshot x")


def test_a_blocked_model_target_is_one_whole_line(make_cfg, tmp_path):
    with pytest.raises(SnapensError) as info:
        train(make_cfg(*EQUAL_CYCLES_2, "model._target_=os.system"), tmp_path)
    message = str(info.value)
    assert message.startswith("model=os.system: Target 'os.system' is blocklisted") and "\n" not in message
    assert message.endswith("HYDRA_INSTANTIATE_ALLOWLIST_OVERRIDE.")  # not cut off after its first line


def test_the_classifier_head_runs_in_fp32_under_bf16_autocast():
    """Logits under bf16 autocast come from an fp32 head: not quantised to bf16's ~8 significant bits."""
    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=10).eval()
    features = []
    model.fc.register_forward_hook(lambda module, args, out: features.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(16, 3, 32, 32))
    assert logits.dtype == torch.float32 and features[0].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(logits, torch.nn.functional.linear(features[0], model.fc.weight, model.fc.bias))
    assert not torch.equal(logits, logits.bfloat16().float())


# ---- any torchvision or timm model by name ---------------------------------------------------------------------------
@pytest.mark.parametrize("library, name", [("torchvision", "resnet18"), ("timm", "resnet10t")])
def test_a_library_model_trains_and_every_tool_rebuilds_it_from_its_snapshots(make_cfg, tmp_path, library, name):
    if library == "timm":
        pytest.importorskip("timm", reason="timm is an extra: pip install -e '.[timm]' (in dev)")
    from snapens import Ensemble
    from snapens.ensemble.program import export_run
    from snapens.snapshots import list_snapshots, read_metadata

    from conftest import compose_config
    run = tmp_path / "run"
    others = [o for o in EQUAL_CYCLES_2 if not o.startswith("model")]  # the CIFAR ResNet's keys left out
    train(make_cfg(*others, f"model={library}", f"model.name={name}"), run)
    snapshots = list_snapshots(run)
    meta = read_metadata(snapshots[-1])
    assert len(snapshots) == 2 and meta["model"] == f"{library}.{name}"
    assert meta["model_config"] == {"_target_": "snapens.models.library_model", "library": library, "name": name,
                                    "num_classes": 4, "kwargs": {}, "weights": ""}
    ensemble = Ensemble.from_run(run)  # members rebuilt from metadata, through the allow-list
    results = json.loads((run / "results.json").read_text())
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    program = export_run(compose_config(f"run={run}", f"out={tmp_path / 'e.pt2'}", name="export"))
    assert torch.allclose(torch.export.load(program).module()(images), ensemble.probs(images).float(), atol=1e-5)
    assert results["ensemble"]["members"] == [p.name for p in snapshots]
    import snapens.ensemble.tool
    assert snapens.ensemble.tool.evaluate(compose_config(f"run={run}", name="ensemble")) == \
        results["ensemble"]["acc"]  # the ensemble tool rebuilds the members too
    student = tmp_path / "student"  # and distillation, whose teacher they are and whose student has their model
    done = subprocess.run([sys.executable, "-m", "snapens.distill", f"run={run}", "trainer.epochs=1",
                           f"hydra.run.dir={student}"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_metadata(list_snapshots(student)[-1])["model"] == f"{library}.{name}"


def test_a_library_models_keywords_pass_through_and_its_metadata_is_bounded():
    model = model_from_metadata({"_target_": "snapens.models.library_model", "library": "torchvision",
                                 "name": "mobilenet_v3_small", "num_classes": 4, "kwargs": {"dropout": 0.5}}, "x")
    assert model.classifier[2].p == 0.5 and model.classifier[-1].out_features == 4
    for config, message in [
        ({"library": "os", "name": "system"}, "model.library=os is not allowed; choose one of: torchvision, timm"),
        ({"library": "torchvision", "name": "../x"}, "model.name=../x is not a torchvision classification model"),
        ({"library": "torchvision", "name": "resnet18", "kwargs": {"norm_layer": [1]}},
         "model.kwargs.norm_layer=[1]: keyword values must be plain"),
        ({"library": "torchvision", "name": "resnet18", "kwargs": {"weights": "DEFAULT"}},
         "model.kwargs.weights is set by snapens"),
    ]:
        with pytest.raises(SnapensError, match=re.escape(f"snapshot x: {message}")):
            model_from_metadata({"_target_": "snapens.models.library_model", "num_classes": 4, **config}, "snapshot x")


def test_pretrained_weights_load_from_a_local_file_all_but_a_classifier_of_other_classes(tmp_path, caplog):
    from safetensors.torch import save_file
    from snapens.models import library_model

    pretrained = library_model("torchvision", "mobilenet_v3_small", 1000)  # as if trained on ImageNet's classes
    save_file(pretrained.state_dict(), tmp_path / "w.safetensors")
    caplog.set_level("INFO", logger="snapens.models.library")
    model = library_model("torchvision", "mobilenet_v3_small", 10, weights=str(tmp_path / "w.safetensors"))
    ours, theirs = model.state_dict(), pretrained.state_dict()
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in head)
    assert ours["classifier.3.weight"].shape == (10, 1024)
    assert "loaded, but for the classifier (classifier.3.bias, classifier.3.weight)" in caplog.text
    rebuilt = model_from_metadata({"_target_": "snapens.models.library_model", "library": "torchvision",
                                   "name": "mobilenet_v3_small", "num_classes": 10, "kwargs": {},
                                   "weights": "/nowhere/w.safetensors"}, "snapshot x")
    assert rebuilt.classifier[3].out_features == 10  # a member's starting weights are not read: its own replace them

    narrow = library_model("torchvision", "mobilenet_v3_small", 1000).state_dict()
    narrow["features.0.0.weight"] = narrow["features.0.0.weight"][:8]  # the stem has 16 filters, as many as the
    save_file(narrow, tmp_path / "narrow.safetensors")  # classes below: it is still not the classifier
    other = library_model("torchvision", "resnet18", 10)
    save_file(other.state_dict(), tmp_path / "resnet.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    for path, parts in [(tmp_path / "resnet.safetensors", ["does not fit this model", "same architecture"]),
                        (tmp_path / "narrow.safetensors", ["1 of another shape beyond the classifier",
                                                           "features.0.0.weight", "same architecture"]),
                        (tmp_path / "bad.safetensors", ["cannot be read", "safetensors file"]),
                        (tmp_path / "none.safetensors", ["cannot be read", "safetensors file"])]:
        with pytest.raises(ValueError) as e:
            library_model("torchvision", "mobilenet_v3_small", 16, weights=str(path))
        says(e.value, f"model.weights={path}", *parts)
