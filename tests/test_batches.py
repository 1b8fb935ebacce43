"""snapens.batches: evaluation batches scale with the image size."""



import torch
from snapens.batches import eval_batches
from snapens.data import Split


def test_evaluation_batches_scale_with_image_size():
    for side, expected in [(32, [1000, 1000, 500]), (64, [250] * 10), (16, [1000, 1000, 500])]:
        split = Split(torch.zeros(2500, 3, side, side, dtype=torch.uint8), torch.zeros(2500, dtype=torch.long))
        sizes = [len(y) for _, y in eval_batches(split, 1000, (0.5,) * 3, (0.25,) * 3)]
        assert sizes == expected, side
