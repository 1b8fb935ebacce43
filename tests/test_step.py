"""snapens.step: clipping on the fp32 gradients, gradient accumulation equal to one full batch, label smoothing's loss."""



import pytest
import torch
import torch.nn.functional as F
from snapens.models import CifarResNet
from snapens.step import StepOptions, train_step


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_step_clips_the_fp32_gradients_exactly(channels_last, precision):
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = CifarResNet(depth=8, num_classes=4).to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32).contiguous(memory_format=layout), torch.randint(0, 4, (16,))
    result = train_step(model, optimizer, x, y, StepOptions(grad_clip=0.01, clip_mode="norm", precision=precision))
    loss, logits, norm = result.loss, result.logits, result.grad_norm
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32 and bool(result.finite)  # fp32 head
    grads = [p.grad for p in model.parameters()]
    assert all(g.dtype == torch.float32 for g in grads) and all(p.dtype == torch.float32 for p in model.parameters())
    assert norm.item() > 0.01  # clipping was active
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(0.01, rel=1e-5)


def test_accumulation_with_half_the_batch_equals_one_full_batch():
    """K=2 micro-batches of 16 give the same update as one batch of 32 on a model without BatchNorm."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.LazyLinear(5)) for _ in range(2)]
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    models[0](x)
    models[1](x)
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for _ in range(3):
        whole = train_step(models[0], optimizers[0], x, y, StepOptions(grad_clip=0.5))
        halves = train_step(models[1], optimizers[1], x, y, StepOptions(grad_clip=0.5, accumulate=2))
        torch.testing.assert_close(halves.loss, whole.loss)  # the batch's mean loss
        torch.testing.assert_close(halves.grad_norm, whole.grad_norm)  # the gradient norm before clipping
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_with_fewer_images_than_pieces():
    """An epoch's last batch may hold fewer images than trainer.accumulate: no empty forward pass."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(1, 4), torch.tensor([1])
    expected = F.cross_entropy(model(x), y).detach()
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, StepOptions(accumulate=3))
    assert result.logits.shape == (1, 2) and bool(result.finite)
    torch.testing.assert_close(result.loss, expected)


def test_label_smoothing_is_the_smoothed_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with torch.no_grad():
        logp = model(x).log_softmax(1)
    expected = (0.9 * -logp[torch.arange(10), y] + 0.1 * -logp.mean(1)).mean()
    result = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, StepOptions(label_smoothing=0.1))
    torch.testing.assert_close(result.loss, expected)
