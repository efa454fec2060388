"""Batches of images from host memory, gathered ahead of time by a background thread.

Used by ``DeviceData`` when a split's images do not fit on the device. The training loop
knows the image rows of the next few batches in advance (the host-side sampler draws them
ahead), so while the device runs step t a worker thread gathers the rows of step t+1, t+2
into fresh pinned buffers (``index_select`` releases the GIL, so this overlaps with the
Python that launches step t) and starts their host→device copies on a side CUDA stream.
Taking a batch then costs one stream wait instead of a gather and a blocking copy.

Buffer safety: a pinned buffer is freed once its copy is queued, and PyTorch's caching host
allocator does not hand the block out again before the copy has finished; the device copy
is allocated on the side stream and marked as used by the consumer's stream
(``record_stream``) so its memory is not reused while the step still reads it.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def _one_thread() -> None:
    torch.get_num_threads()  # settles this thread's own setting from the current default …
    torch.set_num_threads(1)  # … which is then 1 for this thread only once the caller restores it


class HostPrefetcher:
    """Gather ``images[idx]`` (uint8 [n, 3, R, R] in host memory) for queued index vectors.

    ``submit(idx)`` queues a batch (``idx``: int64 CPU tensor [B]); ``take()`` returns the
    oldest queued batch on ``device`` (uint8 [B, 3, R, R]), in submission order."""

    def __init__(self, images: torch.Tensor, device: torch.device):
        if images.device.type != "cpu":
            raise ValueError(f"HostPrefetcher: images must be in host memory, got {images.device}")
        self.device = device
        self.cuda = device.type == "cuda"
        # Not pinned: the gather is a host read; the buffer it fills (and copies from) is.
        self.images = images
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pending: deque[Future] = deque()
        # One intra-op thread for the gathers: a second OpenMP team would spin on the cores
        # the training step computes on (measured on 2 CPU cores: 25% fewer samples/s).
        # torch.set_num_threads also sets the default of threads started later, so the
        # caller's value is put back once the worker has taken its own.
        threads = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eclip-prefetch",
                                       initializer=_one_thread)
        self.pool.submit(int).result()  # start the worker now
        torch.set_num_threads(threads)

    def __len__(self) -> int:
        return len(self.pending)

    def _gather(self, idx: torch.Tensor):
        shape = (idx.numel(), *self.images.shape[1:])
        host = torch.empty(shape, dtype=self.images.dtype, pin_memory=self.cuda)
        torch.index_select(self.images, 0, idx, out=host)
        if not self.cuda:
            return host, None
        with torch.cuda.stream(self.stream):  # the current stream is per thread: this one only
            out = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    def submit(self, idx: torch.Tensor) -> None:
        self.pending.append(self.pool.submit(self._gather, idx.cpu()))

    def take(self) -> torch.Tensor:
        if not self.pending:
            raise RuntimeError("HostPrefetcher.take: no batch was submitted")
        out, done = self.pending.popleft().result()
        if done is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(done)  # the step's kernels start after the copy, without a host wait
            out.record_stream(consumer)
        return out

    def clear(self) -> None:
        """Drop every queued batch (after the sampler was rewound). A gather that failed is
        dropped with it: its error belongs to a batch nobody will take."""
        for fut in self.pending:
            fut.cancel()
        for fut in self.pending:
            if not fut.cancelled():
                try:
                    fut.result()  # let a running gather finish before its buffers are forgotten
                except Exception:
                    pass
        self.pending.clear()

    def close(self) -> None:
        """Drop the queue, stop the thread and let go of the split."""
        try:
            self.clear()
        finally:
            self.pool.shutdown(wait=True)
            self.images = None
