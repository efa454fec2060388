"""eclip.readback: metrics read one log interval late, every loss checked at its own step."""

from __future__ import annotations

import pytest
import torch

from eclip.readback import Diverged, Readback

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def steps(first: int, losses: list[float], device: str, **extra) -> list[tuple[int, dict]]:
    """(step, metrics) as a recipe returns them: 0-d tensors on the device, plus extras."""
    return [(first + i, {"loss": torch.tensor(v, device=device), "lr": torch.tensor(0.5), **extra})
            for i, v in enumerate(losses)]


@pytest.mark.parametrize("device", DEVICES)
def test_rows_arrive_one_push_late_with_the_last_steps_metrics(device):
    rb = Readback(limit=100.0)
    count = torch.tensor(7, device=device)  # an integer metric, e.g. expert samples
    assert rb.push(steps(1, [3.0], device, n=count), {"step": 1}) is None
    row = rb.push(steps(2, [2.5, 2.25], device, n=count, note=4), {"step": 3})
    assert row == {"step": 1, "loss": 3.0, "lr": 0.5, "n": 7.0}
    assert rb.flush() == {"step": 3, "loss": 2.25, "lr": 0.5, "n": 7.0, "note": 4.0}
    assert rb.flush() is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 1e5])
def test_a_diverged_loss_is_reported_at_its_own_step(device, bad):
    rb = Readback(limit=1e4)
    rb.push(steps(1, [1.0, bad, 1.0], device), {"step": 3})  # in the middle: not the row's loss
    with pytest.raises(Diverged, match=f"loss {bad} at step 2"):
        rb.push(steps(4, [1.0], device), {"step": 4})


def test_flush_checks_the_copy_in_flight():
    rb = Readback(limit=10.0)
    rb.push(steps(5, [11.0], "cpu"), {"step": 5})
    with pytest.raises(Diverged, match="loss 11.0 at step 5"):
        rb.flush()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_push_does_not_synchronise_the_device(monkeypatch):
    # Blocking reads raise in CUDA's sync debug mode; waiting on an event is invisible to
    # it, so Event.synchronize is made to raise too: the copy of step 1 arrived long ago,
    # completing it must not wait.
    def no_wait(self):
        raise AssertionError("push waited on the event of a copy that had arrived")

    rb = Readback(limit=100.0)
    x = torch.randn(2048, 2048, device="cuda")
    rb.push(steps(1, [1.0], "cuda"), {"step": 1})
    torch.cuda.synchronize()
    monkeypatch.setattr(torch.cuda.Event, "synchronize", no_wait)
    torch.cuda.set_sync_debug_mode("error")  # any blocking device-to-host read raises
    try:
        pending = [(2, {"loss": (x @ x).mean(), "lr": torch.tensor(0.5)})]
        row = rb.push(pending, {"step": 2})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    monkeypatch.undo()
    assert row["step"] == 1 and row["loss"] == 1.0
    torch.testing.assert_close(rb.flush()["loss"], float((x @ x).mean()), rtol=1e-4, atol=1e-6)


def test_a_loss_at_the_bound_has_not_diverged():
    # the bound is the largest loss allowed; -inf is no number either (a bound cannot catch it)
    rb = Readback(limit=10.0)
    rb.push(steps(1, [10.0], "cpu"), {"step": 1})
    assert rb.flush() == {"step": 1, "loss": 10.0, "lr": 0.5}
    rb = Readback(limit=float("inf"))  # no bound: a non-finite loss is still divergence
    rb.push(steps(1, [float("inf")], "cpu"), {"step": 1})
    with pytest.raises(Diverged, match="loss inf at step 1"):
        rb.flush()


@pytest.mark.parametrize("device", DEVICES)
def test_row_values_are_plain_floats(device):
    # rows go to metrics.jsonl and the result: tensors there would not serialise, and an
    # integer count past 2**24 must survive the copy exactly (it travels as float64)
    import json

    rb = Readback(limit=100.0)
    big = torch.tensor(2 ** 24 + 1, device=device)
    rb.push(steps(1, [1.5], device, n=big, note=3), {"step": 1})
    row = rb.flush()
    assert row == {"step": 1, "loss": 1.5, "lr": 0.5, "n": 16777217.0, "note": 3.0}
    assert all(type(row[k]) is float for k in ("loss", "lr", "n", "note"))
    assert json.loads(json.dumps(row)) == row
