"""The Florence-2 DaViT backbone: conv patch embeddings, spatial-window and channel attention.

Numerically equal to transformers' ``Florence2VisionBackbone`` (and the original remote-code
``DaViT.forward_features_unpool``); written for speed rather than mirrored line by line:

- Activations stay channels-last (``[b, h, w, c]``, contiguous) through every stage. The
  depth-wise and patch convolutions see an NCHW *view* of that memory (PyTorch's
  ``channels_last`` format), so no block transposes ``[b, c, h*w] <-> [b, h*w, c]`` as HF does.
- Spatial window attention partitions all windows of all images with one reshape and runs
  ``F.scaled_dot_product_attention`` over them as one batch (no loop over windows).
- Channel attention is two batched matmuls per block (the "head dim" of that attention is the
  token count, up to 36,864 at 768 px, which no fused SDPA kernel takes).

Every constant matches the reference: LayerNorm eps 1e-5 (``nn.LayerNorm`` default in both),
exact erf GELU (``Florence2VisionConfig.activation_function="gelu"``, original ``nn.GELU``),
3x3 depth-wise convs with padding 1, window attention scale ``head_dim**-0.5``, channel
attention scale ``num_tokens**-0.5``, drop-path rates ``linspace(0, rate, 2 * sum(depths))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcap.config import VisionConfig

# Fused SDPA CUDA kernels launch one grid row per batch entry; more than 2**16 - 1 entries fail
# with "invalid configuration argument" (pytorch/pytorch#142228, #146704). At 768 px the first
# stage has 256 windows per image, so a micro-batch above 255 images is split into chunks.
MAX_SDPA_BATCH = 65535
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default, used by transformers and the original DaViT


class DropPath(nn.Module):
    """Stochastic depth per sample (identity when ``p == 0`` or in eval mode).

    Args:
        p: probability of dropping the whole residual branch of a sample.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * torch.floor(mask + keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _nchw_view(x: torch.Tensor) -> torch.Tensor:
    """[b, h, w, c] -> [b, c, h, w] view (channels_last memory; convs keep that format)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] -> contiguous [b, h, w, c] (free when ``x`` is channels_last)."""
    return x.permute(0, 2, 3, 1).contiguous()


class ConvEmbed(nn.Module):
    """Patch embedding of one stage: strided conv with a LayerNorm before or after it.

    Args:
        in_channels / out_channels: channels before and after the conv.
        kernel_size / stride / padding: the conv's geometry (``patch_*`` of the stage).
        pre_norm: LayerNorm over the input channels before the conv (True) or over the output
            channels after it (False).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        pre_norm: bool,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding
        )
        self.norm = nn.LayerNorm(in_channels if pre_norm else out_channels, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, h, w, c_in] -> [b, h', w', c]
        if self.pre_norm:
            x = self.norm(x)
        x = _nhwc(self.conv(_nchw_view(x)))
        return x if self.pre_norm else self.norm(x)


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2.

    Args:
        dim: input and output width.
        hidden: inner width (``int(dim * mlp_ratio)``).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` windows.

    The map is zero-padded at the bottom / right to a multiple of the window, as in
    transformers: padded positions are real keys and values (``qkv(0) = bias``), with no
    mask. The output projection runs on the cropped map only (it is per token).

    Args:
        dim: channels.
        num_heads: attention heads (head dim ``dim // num_heads``).
        window_size: window side.
        qkv_bias: bias on the qkv projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, h, w, c] -> same
        b, h, w, c = x.shape
        ws, heads = self.window_size, self.num_heads
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        # [b, nh, ws, nw, ws, c] -> [b * nh * nw windows, ws * ws tokens, c]
        win = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        qkv = self.qkv(win).view(b * nh * nw, ws * ws, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [windows, heads, ws * ws, d]
        if q.shape[0] <= MAX_SDPA_BATCH:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(qc, kc, vc, scale=self.scale)
                    for qc, kc, vc in zip(
                        q.split(MAX_SDPA_BATCH), k.split(MAX_SDPA_BATCH), v.split(MAX_SDPA_BATCH)
                    )
                ]
            )
        # [windows, heads, ws*ws, d] -> [b, nh, ws, nw, ws, heads, d] -> [b, h_pad, w_pad, c]:
        # the view only splits dims (valid for any SDPA output strides); one copy in reshape.
        out = out.view(b, nh, nw, heads, ws, ws, c // heads).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(b, nh * ws, nw * ws, c)
        if pad_b or pad_r:
            out = out[:, :h, :w]
        return self.proj(out.contiguous())


class ChannelAttention(nn.Module):
    """Grouped channel attention: in each group, channels attend to channels over all tokens.

    Args:
        dim: channels.
        num_groups: channel groups (``dim // num_groups`` channels each).
        qkv_bias: bias on the qkv projection.
    """

    def __init__(self, dim: int, num_groups: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, h, w, c] -> same
        b, h, w, c = x.shape
        n, g = h * w, self.num_groups
        qkv = self.qkv(x.view(b, n, c)).view(b, n, 3, g, c // g)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)  # each [b, g, c/g, n]
        logits = torch.matmul(q, k.transpose(-1, -2)) * n**-0.5  # [b, g, c/g, c/g]
        attn = logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        out = torch.matmul(attn, v)  # [b, g, c/g, n]
        out = out.permute(0, 3, 1, 2).reshape(b, h, w, c)
        return self.proj(out)


class MixerBlock(nn.Module):
    """DaViT's residual pattern around one attention kind (spatial or channel)::

        x = x + dwconv1(x);  x = x + drop(attn(norm1(x)))
        x = x + dwconv2(x);  x = x + drop(ffn(norm2(x)))

    Args:
        dim: channels.
        attn: a :class:`WindowAttention` or :class:`ChannelAttention` over ``[b, h, w, c]``.
        mlp_ratio: ffn width factor.
        drop_path: stochastic-depth probability of both residual branches.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = attn
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ffn = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, h, w, c] -> same
        x = x + _nhwc(self.conv1(_nchw_view(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + _nhwc(self.conv2(_nchw_view(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class DaViTBlock(nn.Module):
    """One DaViT layer: a spatial (window) mixer block, then a channel mixer block.

    Args:
        cfg: the vision config.
        stage: stage index (selects width, heads and groups).
        drop_path: (spatial, channel) stochastic-depth probabilities.
    """

    def __init__(self, cfg: VisionConfig, stage: int, drop_path: tuple[float, float]) -> None:
        super().__init__()
        dim = cfg.embed_dim[stage]
        self.spatial_block = MixerBlock(
            dim,
            WindowAttention(dim, cfg.num_heads[stage], cfg.window_size, cfg.qkv_bias),
            cfg.mlp_ratio,
            drop_path[0],
        )
        self.channel_block = MixerBlock(
            dim,
            ChannelAttention(dim, cfg.num_groups[stage], cfg.qkv_bias),
            cfg.mlp_ratio,
            drop_path[1],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x))


class DaViT(nn.Module):
    """The Florence-2 DaViT vision backbone (stride 32 in total for the Florence configs).

    ``forward(pixel_values [b, 3, H, W]) -> features [b, embed_dim[-1], H/32, W/32]``; the
    result is a channels_last view (``features.permute(0, 2, 3, 1)`` is contiguous and free).
    Inputs are cast to the parameters' dtype, as transformers does.

    Args:
        cfg: the vision config (transformers' Florence2VisionConfig fields).
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        n = len(cfg.embed_dim)
        rates = torch.linspace(0, cfg.drop_path_rate, 2 * sum(cfg.depths), device="cpu").tolist()
        self.convs = nn.ModuleList(
            ConvEmbed(
                cfg.in_channels if i == 0 else cfg.embed_dim[i - 1],
                cfg.embed_dim[i],
                cfg.patch_size[i],
                cfg.patch_stride[i],
                cfg.patch_padding[i],
                cfg.patch_prenorm[i],
            )
            for i in range(n)
        )
        blocks, offset = [], 0
        for i in range(n):
            blocks.append(
                nn.ModuleList(
                    DaViTBlock(cfg, i, (rates[offset + 2 * j], rates[offset + 2 * j + 1]))
                    for j in range(cfg.depths[i])
                )
            )
            offset += 2 * cfg.depths[i]
        self.blocks = nn.ModuleList(blocks)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.convs[0].conv.weight.dtype)
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # [b, H, W, 3]
        for conv, stage in zip(self.convs, self.blocks):
            x = conv(x)
            for block in stage:
                x = block(x)
        return x.permute(0, 3, 1, 2)
