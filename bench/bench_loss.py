"""The symmetric contrastive loss: ours (Triton on CUDA, the chunked reference on CPU)
against the textbook loss, eager and compiled, forward and forward + backward.

Useful work counted as 6·B²·D flop for forward + backward (one logits matmul, two gradient
matmuls) and 2·B²·D for the forward, for every implementation alike, so TFLOP/s compare.
"""

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.conftest import DEVICE, describe, paired_ratio, peak_extra_bytes, timed

CUDA = DEVICE.type == "cuda"
SHAPES = [(4096, 512), (16384, 512)] if CUDA else [(256, 64), (1000, 100)]
DTYPE = torch.bfloat16 if CUDA else torch.float32


def plain_loss(img, txt, scale):
    logits = scale * img @ txt.T
    y = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits.float(), y) + F.cross_entropy(logits.T.float(), y)) / 2


# static shapes: a caller with one batch size gets a static graph; with the default, the
# second shape seen would make Dynamo recompile with B as a symbol (4 graphs, under its limit)
_compiled = torch.compile(plain_loss, dynamic=False) if CUDA else None
IMPLS = {
    "fused": (lambda i, t, s: kernels.contrastive_loss(i, t, s), False),
    "plain-eager": (plain_loss, True),
    "plain-compile": (lambda i, t, s: _compiled(i, t, s), False),
}


def make(b, d, grad):
    g = torch.Generator(device="cpu").manual_seed(b)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE, DTYPE).requires_grad_(grad)
    txt = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(DEVICE, DTYPE).requires_grad_(grad)
    scale = torch.tensor(14.3, device=DEVICE, requires_grad=grad)
    return img, txt, scale


def make_step(fn, b, d, pass_):
    """One forward (no grad) or forward + backward of ``fn`` on fresh inputs [B, D]."""
    img, txt, scale = make(b, d, pass_ != "fwd")

    def step():
        if pass_ == "fwd":
            with torch.no_grad():
                return fn(img, txt, scale)
        loss = fn(img, txt, scale)
        loss.backward()
        # freed here, not at the next call's start: a memory window around one call then
        # sees its gradients allocated and nothing of an earlier call's freed
        img.grad = txt.grad = scale.grad = None
        return loss.detach()

    step()  # warm-up: autotuning and compilation stay out of the timing
    return step


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("b,d", SHAPES)
@pytest.mark.parametrize("impl", list(IMPLS))
def bench_contrastive_loss(benchmark, impl, b, d, pass_):
    if impl == "plain-compile" and not CUDA:
        pytest.skip("compiling on CPU costs more than the loss at these sizes")
    fn, plain = IMPLS[impl]
    step = make_step(fn, b, d, pass_)
    flop = (6 if pass_ != "fwd" else 2) * b * b * d
    # plain + compile is a reference: its ratio to plain eager measures PyTorch, so the guard skips it
    describe(benchmark, f"loss-{pass_}", impl, plain, B=b, D=d, dtype=str(DTYPE).removeprefix("torch."),
             flop=flop, peak_extra_bytes=peak_extra_bytes(step),  # gradients included
             **({"reference": True} if impl == "plain-compile" else {}))
    loss = benchmark(timed(step))
    assert torch.isfinite(loss)
    if not plain:
        paired_ratio(benchmark, step, make_step(plain_loss, b, d, pass_))
