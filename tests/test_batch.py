"""The training batch a recipe's ``train_step`` receives (``eclip/batch.py``): its size and
its move to another device, which recipes may use (the loop builds batches on the device)."""

import torch

from eclip.batch import Batch


def _batch(b: int = 3, length: int = 5, regions: int = 2) -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 40, (b, length), generator=g)
    return Batch(images=torch.randint(0, 256, (b, 3, 8, 8), dtype=torch.uint8, generator=g), tokens=tokens,
                 mask=torch.ones(b, length, dtype=torch.bool), boxes=torch.rand(b, regions, 4, generator=g),
                 box_mask=torch.ones(b, regions, dtype=torch.bool), phrase_tokens=tokens[:, :2].clone(),
                 phrase_mask=torch.ones(b, 2, dtype=torch.bool), has_region=torch.ones(b, dtype=torch.bool),
                 phrase_id=torch.arange(b))


def test_size_is_the_number_of_samples():
    # not a caption's length or a region count (5 tokens and 2 boxes here)
    assert _batch(b=3).size == 3
    assert _batch(b=1).size == 1


def test_to_moves_every_field_and_keeps_its_values():
    batch = _batch()
    moved = batch.to("meta")
    fields = vars(batch)
    assert set(vars(moved)) == set(fields)
    for name, value in vars(moved).items():
        assert value.device.type == "meta" and value.dtype == fields[name].dtype, name
        assert value.shape == fields[name].shape, name
    back = batch.to(torch.device("cpu"), non_blocking=True)
    for name, value in vars(back).items():
        assert torch.equal(value, fields[name]), name
