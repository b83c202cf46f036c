"""Multi-axis attention (MaxViT): block attention in P x P windows and grid attention over a G x G grid."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from visionzoo.kernels import dense_attention, partition_windows, relative_position_index, unpartition_windows
from visionzoo.kernels.windows import is_static

from .registry import MultiHeadMixer, TokenMixer, register_mixer

__all__ = ["MultiAxisAttention", "PartitionAttention"]


class PartitionAttention(MultiHeadMixer):
    """Self-attention inside each window (``grid=False``) or grid group (``grid=True``) of ``size`` tokens.

    Relative position bias as timm's ``RelPosBias`` (``relative_position_bias_table`` of
    shape ``((2s-1)^2, heads)``). Maps that are not multiples of ``size`` are zero-padded (by
    ``partition_windows``) and the padded tokens are masked out of every attention, then cropped.
    """

    def __init__(
        self,
        dim: int,
        size: int | tuple[int, int],
        grid: bool,
        num_heads: int | None = None,
        head_dim: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, head_dim, qkv_bias, backend)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.grid = grid
        num_offsets = (2 * self.size[0] - 1) * (2 * self.size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_offsets, self.num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.size), persistent=False)

    def no_weight_decay(self) -> set[str]:
        return {"relative_position_bias_table"}

    @torch.no_grad()
    def load_timm_weights(self, attn: nn.Module) -> None:
        """Copy timm's maxxvit ``AttentionCl`` (``head_first=False``, ``rel_pos_type="bias"``) of the same sizes."""
        self.qkv.load_state_dict(attn.qkv.state_dict())
        self.proj.load_state_dict(attn.proj.state_dict())
        self.relative_position_bias_table.copy_(attn.rel_pos.relative_position_bias_table)

    def _bias(self, x: torch.Tensor) -> torch.Tensor:
        """The relative position bias ``(1, heads, N, N)``, or ``(B * windows, heads, N, N)`` with the padding of a
        map ``x`` off the window grid masked out (always with symbolic sizes)."""
        tokens = self.size[0] * self.size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0).to(x.dtype)  # (1, heads, N, N)
        height, width = x.shape[1], x.shape[2]
        if all(is_static(length % size, 0) for length, size in zip((height, width), self.size)):
            return bias
        # one mask per image: windows then only appear times the batch (see kernels.windows.regroup)
        real = torch.ones(x.shape[0], height, width, 1, dtype=torch.bool, device=x.device)
        keep = partition_windows(real, self.size, self.grid).reshape(-1, 1, 1, tokens)
        return bias.masked_fill(~keep, float("-inf"))  # (B * windows, heads, N, N)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        windows = partition_windows(x, self.size, self.grid)
        q, k, v = (t.flatten(2, 3) for t in self.qkv_heads(windows))
        out = dense_attention(q, k, v, self._bias(x), backend=self.kernel_backend)
        out = self.proj(self.merge_heads(out.unflatten(2, self.size)))
        return unpartition_windows(out, self.size, (x.shape[1], x.shape[2]), self.grid)


@register_mixer("multi_axis")
class MultiAxisAttention(TokenMixer):
    """MaxViT's multi-axis attention: block (local) and/or grid (dilated global) attention.

    With ``partition="both"`` the grid attention sees the map after the block attention's
    residual, and the mixer returns the sum of both outputs, so that the enclosing block's
    residual adds each of them once (MaxViT's block-then-grid order, sharing one norm and
    one MLP). For MaxViT's exact layout alternate ``partition="block"`` and ``"grid"`` over
    blocks with per-block mixer arguments instead.

    Args:
        dim: channels.
        num_heads: attention heads; ``dim // head_dim`` when None.
        window_size: block attention window P.
        grid_size: grid attention grid G; ``window_size`` when None.
        partition: ``block``, ``grid`` or ``both``.
        head_dim: channels per head when ``num_heads`` is None.
        qkv_bias: bias on the query/key/value projections.
        backend: kernel backend (``auto``, ``reference``, ``sdpa``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        window_size: int = 7,
        grid_size: int | None = None,
        partition: str = "block",
        head_dim: int = 32,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, backend)
        if partition not in ("block", "grid", "both"):
            raise ValueError(f"partition must be 'block', 'grid' or 'both', got {partition!r}")
        self.partition = partition
        kwargs = dict(num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, backend=backend)
        self.block = PartitionAttention(dim, window_size, grid=False, **kwargs) if partition != "grid" else None
        self.grid = (
            PartitionAttention(dim, grid_size or window_size, grid=True, **kwargs) if partition != "block" else None
        )

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid is None:
            return self.block(x)
        if self.block is None:
            return self.grid(x)
        local = self.block(x)
        return local + self.grid(x + local)
