"""The release's vision forward (``MultiPathCLIPVisionTower.forward``) written out with torch
functions on a release state dict, from the release's definitions:

- ``multipath_encoder_wapper.py``: ViT input ``F.interpolate(x, max(int(R/32*14), 336),
  bilinear, align_corners=True)``; CLIP embeddings, CLS dropped *before* ``pre_layrnorm``; the
  whole ConvNeXt (stem + 4 stages) runs first and its last map feeds every adapter; adapters
  after blocks L/4, L/2, 3L/4; ``MultiPathAlignModule`` at the end.
- ``clip_encoder.py``: ``forward_embeddings`` resamples the position embedding (CLS kept
  aside) with ``F.interpolate(bicubic, antialias=True)`` when the token count differs.
- transformers 4.31 ``CLIPEncoderLayer``: pre-LN attention and MLP, ``quick_gelu``.
- ``convnext.py``: ``ConvNeXtBlock`` (``conv_mlp=False``: channels-last LayerNorm and Linear
  MLP, exact GELU, ``x * weight`` layer scale, identity shortcut), stem conv 4/4 + LayerNorm2d,
  downsample LayerNorm2d + conv 2/2.
- ``S2FStitchAlignModuleV2.forward`` and ``MultiPathAlignModule.forward``.
Nothing from mixres, timm or transformers' modules is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from release_checkpoint import CLIP, PREFIX, Layout

__all__ = ["release_forward"]


def _ln2d(x, sd, pre, eps):  # timm LayerNorm2d: LayerNorm over C of an NCHW map
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[pre + "weight"], sd[pre + "bias"], eps).permute(0, 3, 1, 2)


def _convnext(x, sd, layout: Layout):
    pre, eps = f"{PREFIX}slow_vision_tower.vision_tower.", layout.norm_eps
    x = F.conv2d(x, sd[pre + "stem.0.weight"], sd[pre + "stem.0.bias"], stride=4)
    x = _ln2d(x, sd, pre + "stem.1.", eps)
    for s, depth in enumerate(layout.depths):
        if s:
            x = _ln2d(x, sd, f"{pre}stages.{s}.downsample.0.", eps)
            x = F.conv2d(x, sd[f"{pre}stages.{s}.downsample.1.weight"], sd[f"{pre}stages.{s}.downsample.1.bias"], stride=2)
        for b in range(depth):
            p = f"{pre}stages.{s}.blocks.{b}."
            c = x.shape[1]
            y = F.conv2d(x, sd[p + "conv_dw.weight"], sd[p + "conv_dw.bias"], padding=3, groups=c).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (c,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps)
            y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]).permute(0, 3, 1, 2)
            x = y.mul(sd[p + "weight"].reshape(1, -1, 1, 1)) + x
    return x


def _embeddings(x, sd):
    pre = f"{PREFIX}fast_vision_tower.vision_tower.vision_model.embeddings."
    patches = F.conv2d(x, sd[pre + "patch_embedding.weight"], stride=CLIP["patch_size"]).flatten(2).transpose(1, 2)
    cls = sd[pre + "class_embedding"].expand(x.shape[0], 1, -1)
    tokens = torch.cat([cls, patches], 1)
    pos = sd[pre + "position_embedding.weight"][None]
    if pos.shape[1] != tokens.shape[1]:  # clip_encoder.resample_pos_embed
        old, new = int(math.sqrt(pos.shape[1] - 1)), int(math.sqrt(tokens.shape[1] - 1))
        grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])
        pos = torch.cat([pos[:, :1], grid], 1)
    return tokens + pos


def _clip_layer(y, sd, i):
    p = f"{PREFIX}fast_vision_tower.vision_tower.vision_model.encoder.layers.{i}."
    c, heads = CLIP["hidden_size"], CLIP["num_attention_heads"]
    lin = lambda t, name: F.linear(t, sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    h = F.layer_norm(y, (c,), sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], 1e-5)
    q, k, v = (lin(h, f"self_attn.{n}_proj").unflatten(-1, (heads, c // heads)).transpose(1, 2) for n in "qkv")
    attn = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1) @ v
    y = y + lin(attn.transpose(1, 2).flatten(2), "self_attn.out_proj")
    h = F.layer_norm(y, (c,), sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], 1e-5)
    h = lin(h, "mlp.fc1")
    return y + lin(h * torch.sigmoid(1.702 * h), "mlp.fc2")  # quick_gelu


def _align(src, dst_len):  # src2dst_align: bilinear up (align_corners) or avg-pool down, square grids
    b, n, c = src.shape
    s, d = int(math.sqrt(n)), int(math.sqrt(dst_len))
    grid = src.transpose(1, 2).reshape(b, c, s, s)
    if n < dst_len:
        grid = F.interpolate(grid, size=(d, d), mode="bilinear", align_corners=True)
    elif n > dst_len:
        grid = F.avg_pool2d(grid, s // d, s // d)
    return grid.reshape(b, c, -1).transpose(1, 2)


def _adapter(fast, slow, sd, i):
    p = f"{PREFIX}align_stages_latent.{i}."
    w = lambda name: (sd[p + name + ".weight"], sd[p + name + ".bias"])  # noqa: E731
    b, n, d = fast.shape
    slow = F.conv2d(F.gelu(F.conv2d(slow, *w("slow_conv"))), *w("slow_proj"))
    slow = _align(slow.reshape(b, d, -1).transpose(1, 2), n)
    side = int(math.sqrt(n))
    grid = fast.transpose(1, 2).reshape(b, d, side, side)
    grid = grid + F.conv2d(F.gelu(F.conv2d(grid, *w("fast_conv"), padding=3, groups=d)), *w("fast_proj"))
    fast = grid.reshape(b, d, n).transpose(1, 2)
    gate = F.linear(F.gelu(F.linear(torch.cat([fast, slow], -1).mean(1), *w("gate.0"))), *w("gate.2")).unsqueeze(1)
    return fast + slow * gate.tanh()


def release_forward(images: torch.Tensor, sd: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """``MultiPathCLIPVisionTower.forward(images)``: Tensor[B, N, C_clip] (float32 math)."""
    sd = {k: v.float() for k, v in sd.items() if k.startswith(PREFIX)}
    x = images.float()
    side = max(int(layout.image_size / 32 * 14), 336)
    y = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=True)
    y = _embeddings(y, sd)[:, 1:]
    pre = f"{PREFIX}fast_vision_tower.vision_tower.vision_model.pre_layrnorm."
    y = F.layer_norm(y, (CLIP["hidden_size"],), sd[pre + "weight"], sd[pre + "bias"], 1e-5)
    slow = _convnext(x, sd, layout)
    n_blks = CLIP["num_hidden_layers"] // 4
    for i in range(CLIP["num_hidden_layers"]):
        y = _clip_layer(y, sd, i)
        if (i + 1) % n_blks == 0 and (i + 1) // n_blks <= 3:
            y = _adapter(y, slow, sd, (i + 1) // n_blks - 1)
    p = f"{PREFIX}align_stages.0."
    slow_tokens = _align(slow.flatten(2).transpose(1, 2), y.shape[1])
    return F.linear(y, sd[p + "fast_proj.weight"], sd[p + "fast_proj.bias"]) + F.linear(
        slow_tokens, sd[p + "slow_proj.weight"], sd[p + "slow_proj.bias"])
