"""Step metrics from the device to the host without making the device wait.

The loop logs every few steps. Reading a metric with ``float()`` at that moment would block
the host until the device has finished every queued kernel, and the device would then
idle while the host launches the next step. Instead, at each log point the losses of every
step since the last one and the last step's other metrics are stacked into one device
tensor whose copy into pinned host memory starts right away (``non_blocking``, an event
behind it). The copy is read at the next log point, when it has long arrived: the row it
completes is one log interval late, and divergence is still reported at the step where it
happened (at most two intervals later). Values already on the host are read at once.
"""

from __future__ import annotations

import math

import torch


class Diverged(Exception):
    """The loss became NaN/Inf or exceeded the divergence bound."""


def check_losses(losses: list[tuple[int, float]], limit: float) -> None:
    """Raise ``Diverged`` at the first (step, loss) that is NaN/Inf or above ``limit``."""
    for step, loss in losses:
        if not math.isfinite(loss) or loss > limit:
            raise Diverged(f"loss {loss} at step {step}")


def _on_device(v) -> bool:
    return isinstance(v, torch.Tensor) and v.device.type != "cpu"


class Readback:
    """One copy in flight at a time: ``push`` starts the next and completes the previous."""

    def __init__(self, limit: float):
        self.limit = limit  # a loss above this counts as divergence
        self._flight = None  # (row, steps, keys, values, host copy, event)

    def push(self, pending: list[tuple[int, dict]], row: dict) -> dict | None:
        """Start reading ``pending`` ((step, metrics) since the last push; the last entry's
        metrics fill ``row``). Returns the row completed by the previous push, or None.
        Raises ``Diverged`` when a loss of the previous push diverged."""
        steps = [s for s, _ in pending]
        last = pending[-1][1]
        keys = list(last)
        values = [m["loss"] for _, m in pending] + [last[k] for k in keys]  # losses, then metrics
        dev = [v for v in values if _on_device(v)]
        host = event = None
        if dev:
            stacked = torch.stack([v.detach().reshape(()).to(torch.float64) for v in dev])  # [n]
            host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=stacked.is_cuda)
            host.copy_(stacked, non_blocking=True)
            if stacked.is_cuda:  # behind the copy, on the stream of the copy's device
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(stacked.device))
        values = [None if _on_device(v) else float(v) for v in values]  # host values now
        previous, self._flight = self._flight, (row, steps, keys, values, host, event)
        return self._complete(previous)

    def flush(self) -> dict | None:
        """Wait for the copy in flight and return its completed row (None when there is none)."""
        previous, self._flight = self._flight, None
        return self._complete(previous)

    def _complete(self, flight) -> dict | None:
        if flight is None:
            return None
        row, steps, keys, values, host, event = flight
        if event is not None and not event.query():  # query: no sync call when it has arrived
            event.synchronize()
        fetched = iter(host.tolist() if host is not None else [])
        values = [next(fetched) if v is None else v for v in values]
        check_losses(list(zip(steps, values[: len(steps)], strict=True)), self.limit)
        return {**row, **dict(zip(keys, values[len(steps):], strict=True))}
