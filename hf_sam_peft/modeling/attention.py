"""SAM's image-encoder attention with the relative-position bias folded into the keys: one fused SDPA call.

transformers' ``SamVisionAttention`` adds SAM's decomposed relative-position bias as a dense
``(heads, N, N)`` tensor (N = 4096 tokens in the global blocks of a 1024² ViT): "eager" materialises it and
several same-sized tensors (add, softmax, casts), and "sdpa" passes it as ``attn_mask``, which sends
training (a bias that needs gradients) to the slow math kernel. Both are memory-bound on that tensor.

The bias is a sum of a row term and a column term, ``bias[q, (i, j)] = rel_h[q, i] + rel_w[q, j]``, so it
is itself a dot product: append ``rel_h[q]`` and ``rel_w[q]`` to each (pre-scaled) query and the one-hot
codes of the key's row ``i`` and column ``j`` to each key. Then ``q'·k' = scale·q·k + rel_h[q, i] +
rel_w[q, j]`` exactly, and attention runs as plain SDPA without a mask: the fused flash kernel (CPU and
CUDA), forward and backward, never building an ``N x N`` tensor. Values are zero-padded to the widened
head size (the flash kernels want equal q/k/v head sizes) and the padding is cut from the output.
Gradients reach the queries and the ``rel_pos_h``/``rel_pos_w`` parameters through the appended terms.

Memory (CPU training): left to autograd, the flash kernel's backward keeps the *widened* query, key, padded
value and padded output (4 x 192 channels per head in a global block, 4 x 92 in a 14x14 window, against 64),
plus the ``qkv`` output for the bias terms' einsums. :class:`_LeanFlashAttention` keeps only ``qkv``'s view,
the unpadded output and the log-sum-exp, and rebuilds the widened operands in backward (two concatenations,
a pad and the two small einsums; the attention itself is not recomputed). The flash kernels are called with
the same operands as ``F.scaled_dot_product_attention`` would pass them, so outputs and gradients are those
of the autograd path. Measured on ViT-B, float32, one 1024² image, LoRA: a global block keeps 59 instead of
155 MiB for backward, a windowed block (25 windows) 67 instead of 92 MiB; the encoder 1.68 instead of 2.25 GiB
(half of each under bf16 autocast). CUDA keeps the plain SDPA call (its kernels differ; not tested here).

Key tiles (CPU): widening costs head size — a global block's flash call runs at 64 + 64 + 64 = 192
channels, and the kernel's time grows about linearly with it (ViT-B global block, float32, 2 cores: 2.5 s
forward + backward at 192 against 1.0 s at 64). A tile of ``s x s`` keys needs only its own ``s`` rows' and
``s`` columns' bias terms, so :class:`_LeanFlashAttention` cuts the key grid into such tiles
(``SamVisionFusedAttention.key_tile``), runs one flash call per tile at ``64 + 2s`` channels and merges the
tiles' outputs by their log-sum-exps (in float32); backward calls the flash backward per tile with the merged
output and log-sum-exp, which is the exact gradient of the whole softmax restricted to the tile's keys. With
``s = 32`` a global block's attention (forward + backward) takes 2.17 instead of 3.08 s in float32 without AMX
and 0.90 instead of 1.02 s in bf16 with AMX. The same forward runs under ``no_grad`` on the CPU (a frozen
encoder, inference). Results equal one call over all keys up to summation order (float32) or one bf16
rounding of each tile's output (bf16).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers.models.sam.modeling_sam import SamVisionAttention

from .private_ops import cpu_flash_attention, cpu_flash_attention_available, cpu_flash_attention_backward


# ViT-B global block (64 x 64 keys), forward + backward of the attention module, 2 CPU cores, one run each
# (the measurement of benchmarks/encoder_attention.py; benchmarks/RESULTS.md): float32 3.08 s
# untiled, 2.23 s with 16 x 16 tiles, 2.17 s with 32 x 32; bf16 with AMX 1.02 / 1.08 / 0.90 s; bf16 without
# AMX 2.74 / 2.00 / 2.12 s. 32 is the one side that never loses.
DEFAULT_KEY_TILE = 32


def _key_position_codes(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(height*width, height+width)``: for key token ``i*width + j``, one-hot ``i`` then one-hot ``j``."""
    # tokens are row-major over the grid, so token t has row t // width (each eye row repeated width times) ...
    rows = torch.eye(height, device=device, dtype=dtype).repeat_interleave(width, dim=0)
    # ... and column t % width (the whole eye tiled height times)
    cols = torch.eye(width, device=device, dtype=dtype).repeat(height, 1)
    return torch.cat([rows, cols], dim=1)


class SamVisionFusedAttention(SamVisionAttention):
    """``SamVisionAttention`` computed by one maskless SDPA call (same parameters, same result).

    Switch an existing module with ``module.__class__ = SamVisionFusedAttention`` (see
    ``hf_sam_peft.speed.set_encoder_attention``). ``output_attentions=True`` falls back to the
    eager computation, the only one that has the weights to return.

    ``key_tile``: on the CPU (training and ``no_grad``), the side of the square key tiles the attention is cut
    into (``_key_tiles``; ``None``, or a side that does not divide the grid or equals it: one call over all keys).
    ``DEFAULT_KEY_TILE`` makes each of ViT-B's global blocks 4 flash calls at head size 128 instead of one at
    192; windowed blocks (14 x 14) stay one call. Set by ``EfficiencyOptions.encoder_key_tile``.
    """

    key_tile: int | None = DEFAULT_KEY_TILE

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool | None = False) -> tuple[torch.Tensor, None]:
        if output_attentions:
            return super().forward(hidden_states, output_attentions=True)
        batch, height, width, _ = hidden_states.shape
        heads, tokens = self.num_attention_heads, height * width
        # transformers' SamVisionAttention.forward splits qkv this way; unbind keeps the heads axis instead of its
        # reshape to (batch * heads, ...), which is the layout SDPA takes
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # (batch, heads, tokens, head_dim)
        head_dim = query.shape[-1]
        # transformers applies it through F.dropout(training=self.training): the same rule
        dropout = self.dropout if self.training else 0.0
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        else:
            # outside the autograd Function: the tables' gradients reach rel_pos_h / rel_pos_w through get_rel_pos's own
            # interpolate and gather under autograd
            table_h = self.get_rel_pos(height, height, self.rel_pos_h)
            table_w = self.get_rel_pos(width, width, self.rel_pos_w)
            if _lean_applies(query, dropout):
                dtype = _sdpa_dtype(query)
                # cast before the Function (inside it autocast is off): autograd carries the gradients back through
                # these casts to the float32 parameters
                query, key, value, table_h, table_w = (t.to(dtype) for t in (query, key, value, table_h, table_w))
                out = _LeanFlashAttention.apply(
                    query, key, value, table_h, table_w, self.scale, height, width, self.key_tile)
                return self.proj(out.view(batch, height, width, heads * head_dim)), None
            operands = _widened_operands(query, key, value, table_h, table_w, self.scale, height, width)
            # scale=1.0: the queries are pre-scaled and the appended bias terms must stay unscaled; the slice cuts the
            # zero padding of the values
            out = F.scaled_dot_product_attention(*operands, dropout_p=dropout, scale=1.0)[..., :head_dim]
        out = out.transpose(1, 2).reshape(batch, height, width, heads * head_dim)
        return self.proj(out), None


def _relative_terms(
    query: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, height: int, width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rel_h(q)``, ``rel_w(q)``: ``(batch, heads, tokens, height)`` and ``(..., width)`` bias terms per query.

    ``table_h``/``table_w``: ``get_rel_pos``'s ``(height, height, head_dim)`` / ``(width, width, head_dim)``
    tables; ``rel_h(q)[i*width + j, k] = q · table_h[i, k]`` (transformers' ``get_decomposed_rel_pos``).
    """
    batch, heads, tokens, head_dim = query.shape
    # from the unscaled query, as transformers' get_decomposed_rel_pos (SamVisionAttention scales only q . k)
    grid = query.reshape(batch * heads, height, width, head_dim)
    # transformers' einsums: here "b" is batch * heads and "h" / "w" the query's row and column
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid, table_h).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid, table_w).reshape(batch, heads, tokens, width)
    return rel_h, rel_w


def _widened_operands(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor,
    scale: float, height: int, width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The maskless SDPA operands (scale 1) over all keys: ``[scale*q, rel_h(q), rel_w(q)]``, ``[k, codes]``, ``[v, 0]``."""
    rel_h, rel_w = _relative_terms(query, table_h, table_w, height, width)
    return _tile_operands(query * scale, key, value, rel_h, rel_w, KeyTile(slice(0, height), slice(0, width), width))


class KeyTile(NamedTuple):
    """A block of key rows x key columns of the ``height x width`` key grid (``width``: the grid's)."""

    rows: slice
    cols: slice
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the tile: the one-hot code widths its key operand appends."""
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start


def _key_tiles(height: int, width: int, side: int | None) -> list[KeyTile]:
    """The key grid cut into ``side x side`` tiles; one tile (the whole grid) where ``side`` does not divide it.

    Why tiles: a key tile's bias needs only its own rows' and columns' terms, so each tile's attention runs at
    head size ``head_dim + side + side`` (128 for ViT-B's 64 x 64 global grid with 32 x 32 tiles) instead of
    ``head_dim + height + width`` (192), and the tiles' outputs are merged by their log-sum-exps.
    """
    if side is None or height % side or width % side or (height == side and width == side):
        return [KeyTile(slice(0, height), slice(0, width), width)]
    return [KeyTile(slice(r, r + side), slice(c, c + side), width)
            for r in range(0, height, side) for c in range(0, width, side)]


def _tile_operands(
    scaled_query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
    tile: KeyTile,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maskless SDPA operands (scale 1) for the keys of ``tile``: ``q'·k' = scale·q·k + rel_h[q, i] + rel_w[q, j]``.

    Query ``[scale*q, rel_h(q)[tile rows], rel_w(q)[tile cols]]``; key ``[k, one-hot row, one-hot col]`` (within
    the tile); value zero-padded to the same head size (torch's flash kernels want equal q/k/v head sizes).
    """
    batch, heads, tokens, head_dim = key.shape
    height = tokens // tile.width
    n_rows, n_cols = tile.shape

    def keys_of_tile(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, heads, height, tile.width, head_dim)[:, :, tile.rows, tile.cols].reshape(
            batch, heads, n_rows * n_cols, head_dim)

    wide_query = torch.cat([scaled_query, rel_h[..., tile.rows], rel_w[..., tile.cols]], dim=-1)
    # codes index rows and columns within the tile, matching rel_h / rel_w sliced to the tile's rows and columns
    codes = _key_position_codes(n_rows, n_cols, key.device, key.dtype)
    wide_key = torch.cat([keys_of_tile(key), codes.expand(batch, heads, -1, -1)], dim=-1)
    # zero padding: those output channels are probabilities times 0, cut by the callers
    wide_value = F.pad(keys_of_tile(value), (0, n_rows + n_cols))
    return wide_query, wide_key, wide_value


def _lean_applies(query: torch.Tensor, dropout: float) -> bool:
    """:class:`_LeanFlashAttention` serves the CPU without dropout (SAM's encoder has none), where torch's private
    flash operators work as called (:mod:`hf_sam_peft.modeling.private_ops`; else the public SDPA path).

    With gradients it keeps the unwidened tensors for backward; under ``no_grad`` (a frozen encoder in training,
    inference) it only runs its key-tiled forward, which is faster than one call over all keys there too.
    """
    return query.device.type == "cpu" and dropout == 0.0 and cpu_flash_attention_available()


def _sdpa_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype ``F.scaled_dot_product_attention`` would compute in (it is on autocast's lower-precision list)."""
    if torch.is_autocast_enabled("cpu") and query.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return query.dtype


class _LeanFlashAttention(torch.autograd.Function):
    """The widened maskless attention on CPU, keeping the unwidened tensors for backward (module docstring).

    forward: ``(batch, heads, tokens, head_dim)`` query/key/value and the rel-pos tables, all in one dtype, and
    the key tile side (``None``: one tile); returns ``(batch, tokens, heads * head_dim)`` (the layout ``proj``
    reads). With several key tiles, each tile's output and log-sum-exp come from one flash call and are merged
    in float32 (forward); backward calls the flash backward per tile with the merged output and log-sum-exp,
    which is the exact gradient of the whole attention restricted to that tile's keys.
    """

    @staticmethod
    def forward(ctx, query, key, value, table_h, table_w, scale: float, height: int, width: int, tile_side):
        batch, heads, tokens, head_dim = query.shape
        tiles = _key_tiles(height, width, tile_side)
        # autocast off: the operands are already in one dtype (cast by the caller), which autocast would override
        # for the einsums
        with torch.autocast("cpu", enabled=False):
            rel_h, rel_w = _relative_terms(query, table_h, table_w, height, width)
            scaled_query = query * scale
            out = logsumexp = None
            for tile in tiles:
                operands = _tile_operands(scaled_query, key, value, rel_h, rel_w, tile)
                tile_out, tile_lse = cpu_flash_attention(*operands)
                tile_out = tile_out[..., :head_dim]
                if out is None:
                    # several tiles: accumulate in float32, so the bf16 result is rounded once, at the end
                    out, logsumexp = (tile_out if len(tiles) == 1 else tile_out.float()), tile_lse
                    continue
                # the online-softmax merge: rescale what is merged so far and the new tile to the combined normaliser
                merged = torch.logaddexp(logsumexp, tile_lse)
                out.mul_((logsumexp - merged).exp_().unsqueeze(-1))
                out.add_(tile_out * (tile_lse - merged).exp_().unsqueeze(-1))
                logsumexp = merged
        out = out.to(query.dtype).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        # only unwidened tensors: the widened operands are rebuilt in backward (module docstring); `out` is also
        # returned, so saving it costs no extra memory
        ctx.save_for_backward(query, key, value, table_h, table_w, out, logsumexp)
        ctx.geometry = (scale, height, width, tile_side)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved_inputs, out, logsumexp = ctx.saved_tensors
        scale, height, width, tile_side = ctx.geometry
        query, key, value, table_h, table_w = saved_inputs
        batch, heads, tokens, head_dim = query.shape
        tiles = _key_tiles(height, width, tile_side)
        needs = [ctx.needs_input_grad[i] for i in (0, 3, 4)]
        # the bias terms are recomputed on detached copies under enable_grad (backward runs without grad mode): a small
        # graph from the wide query's parts back to query and the tables, differentiated below
        sources = [t.detach().requires_grad_(need) for t, need in zip((query, table_h, table_w), needs)]
        with torch.enable_grad():
            scaled_query = sources[0] * scale
            rel_h, rel_w = _relative_terms(*sources, height, width)
        pad = (0, sum(tiles[0].shape))  # every tile has the same shape

        def widened(t: torch.Tensor) -> torch.Tensor:  # (batch, tokens, heads*head_dim) -> padded (b, h, t, wide)
            return F.pad(t.reshape(batch, tokens, heads, head_dim).transpose(1, 2), pad)

        # the true wide output has zeros in the padded channels and their gradient is zero (they are cut), so padding
        # the unwidened out / grad_out with zeros gives the flash backward its exact operands
        grad_wide_out, wide_out = widened(grad_out), widened(out)
        accumulate = torch.float32 if len(tiles) > 1 else query.dtype
        grad_scaled, grad_rel_h, grad_rel_w = (query.new_zeros(t.shape, dtype=accumulate) for t in (query, rel_h, rel_w))
        # new_empty is safe: the tiles partition the key grid, so every key's gradient is written exactly once below
        grad_key, grad_value = (query.new_empty(batch, heads, height, width, head_dim) for _ in range(2))
        for tile in tiles:
            operands = _tile_operands(scaled_query.detach(), key, value, rel_h.detach(), rel_w.detach(), tile)
            # the merged out and log-sum-exp, not the tile's: the kernel's probabilities are then the whole softmax's on
            # this tile's keys, and per-tile query gradients sum to the exact one
            g_query, g_key, g_value = cpu_flash_attention_backward(grad_wide_out, *operands, wide_out, logsumexp)
            n_rows = tile.shape[0]
            grad_scaled += g_query[..., :head_dim]
            # the wide query is [scaled q | rel_h on the tile's rows | rel_w on its columns]: its gradient splits so
            grad_rel_h[..., tile.rows] += g_query[..., head_dim:head_dim + n_rows]
            grad_rel_w[..., tile.cols] += g_query[..., head_dim + n_rows:]
            for whole, part in ((grad_key, g_key), (grad_value, g_value)):
                whole[:, :, tile.rows, tile.cols] = part[..., :head_dim].reshape(whole[:, :, tile.rows, tile.cols].shape)
        wanted = [t for t in sources if t.requires_grad]
        found = iter(torch.autograd.grad(
            [scaled_query, rel_h, rel_w], wanted,
            # grad_outputs in the recomputed tensors' dtype (the accumulators may be float32)
            [g.to(query.dtype) for g in (grad_scaled, grad_rel_h, grad_rel_w)], allow_unused=True) if wanted else ())
        grad_query, grad_table_h, grad_table_w = (next(found) if t.requires_grad else None for t in sources)
        return (grad_query, grad_key.reshape(query.shape), grad_value.reshape(query.shape),
                # None for scale, height, width and tile_side (not tensors)
                grad_table_h, grad_table_w, None, None, None, None)


__all__ = ["SamVisionFusedAttention"]
