"""The two encoder towers of the CLIP model: a ViT image tower and a transformer text tower.

Both are pre-norm transformer encoders built from the same ``Block`` (LayerNorm →
multi-head self-attention through ``F.scaled_dot_product_attention`` → residual, LayerNorm
→ GELU MLP → residual). Each tower returns one pooled feature per sample; the projection to
the shared embedding space and the L2 normalisation live in ``eclip.model``.

FLOP counts (``*_flops``) follow the usual convention: a matmul of [m, k] by [k, n] is
2·m·n·k; attention adds 2·T²·w for the scores and 2·T²·w for the weighted values;
normalisation, activations and softmax are not counted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from eclip.model import TextConfig, VisionConfig


def init_linear_(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights and zero biases for every Linear/Conv2d inside ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    ``key_mask``: bool [B, T], True where a token may be attended to (None: all tokens).
    Every row must have at least one True, otherwise its softmax is undefined (NaN).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, w = x.shape
        # [B, T, 3W] -> 3 × [B, heads, T, W/heads]
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def block_flops(tokens: int, width: int, mlp_ratio: float) -> int:
    """Forward FLOPs of one ``Block`` over ``tokens`` tokens (one sample)."""
    hidden = int(round(width * mlp_ratio))
    t, w = tokens, width
    qkv = 2 * t * w * 3 * w
    scores_and_values = 2 * (2 * t * t * w)
    proj = 2 * t * w * w
    mlp = 2 * (2 * t * w * hidden)
    return qkv + scores_and_values + proj + mlp


def init_residual_(blocks: nn.ModuleList, std: float = 0.02) -> None:
    """Shrink the residual-branch output projections by 1/sqrt(2·depth) (GPT-2 style) so the
    residual stream's variance does not grow with depth at initialisation."""
    s = std / math.sqrt(2 * len(blocks))
    for blk in blocks:
        for lin in (blk.attn.proj, blk.fc2):
            nn.init.trunc_normal_(lin.weight, std=s, a=-2 * s, b=2 * s)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions [grid·grid, width] (row-major patch order): a quarter
    of the channels each for sin/cos of the row and of the column at geometric frequencies."""
    if width % 4:
        raise ValueError(f"vision.width must be divisible by 4 for sincos positions, got {width}")
    quarter = width // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    ang_y = ys.reshape(-1, 1) * omega  # [N, W/4]
    ang_x = xs.reshape(-1, 1) * omega
    return torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1).float()


class VisionTower(nn.Module):
    """ViT over normalised float images [B, 3, H, W] → pooled features [B, width].

    ``embed_patches`` and ``forward_tokens`` are separate so the expert path can run the same
    transformer on an image it has produced itself.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.num_patches = grid * grid
        w = cfg.width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w)) if cfg.pool == "cls" else None
        n_tok = self.num_patches + (1 if cfg.pool == "cls" else 0)
        if cfg.pos == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, w))
        else:
            pos = sincos_2d(grid, w)
            if cfg.pool == "cls":  # the CLS token gets no position (zeros)
                pos = torch.cat([torch.zeros(1, w), pos])
            self.register_buffer("pos_embed", pos[None], persistent=False)
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth)
        )
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        init_linear_(self)
        init_residual_(self.blocks)
        if cfg.pos == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] float → patch tokens [B, N, width]."""
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, width] → pooled feature [B, width]."""
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        x = tokens + self.pos_embed.to(tokens.dtype)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_post(x)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed_patches(x))

    def flops(self) -> int:
        """Forward FLOPs per image (patch embedding + blocks)."""
        c = self.cfg
        t = self.num_patches + (1 if c.pool == "cls" else 0)
        patch = 2 * self.num_patches * (3 * c.patch_size**2) * c.width
        return patch + c.depth * block_flops(t, c.width, c.mlp_ratio)


class TextTower(nn.Module):
    """Transformer encoder over token ids [B, L] with a padding mask [B, L] → [B, width].

    Padding never influences the output: padded keys are masked out of attention, and
    pooling reads only the CLS token (prepended here, always valid) or the mean over real
    tokens. A row with no real token at all (an absent phrase) attends to its first
    position only, so its output is finite; callers should not rely on its value.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w)) if cfg.pool == "cls" else None
        n_pos = cfg.context_length + (1 if cfg.pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, w))
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.depth)
        )
        self.ln_post = nn.LayerNorm(w, eps=cfg.ln_eps)
        init_linear_(self)
        init_residual_(self.blocks)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.01, a=-0.02, b=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length = tokens.shape
        if length > self.cfg.context_length:
            raise ValueError(
                f"tokens: length {length} exceeds text.context_length {self.cfg.context_length}"
            )
        mask = mask.to(torch.bool)
        x = self.token_embed(tokens)  # [B, L, W]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x], dim=1)
            mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        else:
            # A row without any real token would give an all-masked softmax (NaN): let such
            # rows attend to position 0. Branch-free so torch.compile sees one graph.
            empty = ~mask.any(dim=1, keepdim=True)  # [B, 1]
            first = torch.arange(length, device=mask.device) == 0  # [L]
            mask = mask | (empty & first)
        x = x + self.pos_embed[:, : x.shape[1]].to(x.dtype)
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.ln_post(x)
        if self.cls_token is not None:
            return x[:, 0]
        weights = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
        return (x * weights).sum(dim=1) / weights.sum(dim=1)

    def flops(self, length: int | None = None) -> int:
        """Forward FLOPs per caption padded to ``length`` tokens (default: context length);
        attention runs over the padded length, so padding is counted."""
        c = self.cfg
        t = (c.context_length if length is None else length) + (1 if c.pool == "cls" else 0)
        return c.depth * block_flops(t, c.width, c.mlp_ratio)
