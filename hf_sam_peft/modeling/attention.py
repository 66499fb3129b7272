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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.sam.modeling_sam import SamVisionAttention


def _key_position_codes(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(height*width, height+width)``: for key token ``i*width + j``, one-hot ``i`` then one-hot ``j``."""
    rows = torch.eye(height, device=device, dtype=dtype).repeat_interleave(width, dim=0)
    cols = torch.eye(width, device=device, dtype=dtype).repeat(height, 1)
    return torch.cat([rows, cols], dim=1)


class SamVisionFusedAttention(SamVisionAttention):
    """``SamVisionAttention`` computed by one maskless SDPA call (same parameters, same result).

    Switch an existing module with ``module.__class__ = SamVisionFusedAttention`` (see
    ``hf_sam_peft.training.efficiency.set_encoder_attention``). ``output_attentions=True`` falls back to the
    eager computation, the only one that has the weights to return.
    """

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool | None = False) -> tuple[torch.Tensor, None]:
        if output_attentions:
            return super().forward(hidden_states, output_attentions=True)
        batch, height, width, _ = hidden_states.shape
        heads, tokens = self.num_attention_heads, height * width
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # (batch, heads, tokens, head_dim)
        head_dim = query.shape[-1]
        dropout = self.dropout if self.training else 0.0
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        else:
            table_h = self.get_rel_pos(height, height, self.rel_pos_h)
            table_w = self.get_rel_pos(width, width, self.rel_pos_w)
            if _lean_applies(query, dropout):
                dtype = _sdpa_dtype(query)
                query, key, value, table_h, table_w = (t.to(dtype) for t in (query, key, value, table_h, table_w))
                out = _LeanFlashAttention.apply(query, key, value, table_h, table_w, self.scale, height, width)
                return self.proj(out.view(batch, height, width, heads * head_dim)), None
            operands = _widened_operands(query, key, value, table_h, table_w, self.scale, height, width)
            out = F.scaled_dot_product_attention(*operands, dropout_p=dropout, scale=1.0)[..., :head_dim]
        out = out.transpose(1, 2).reshape(batch, height, width, heads * head_dim)
        return self.proj(out), None


def _widened_operands(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor,
    scale: float, height: int, width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The maskless SDPA operands (scale 1): ``[scale*q, rel_h(q), rel_w(q)]``, ``[k, codes]``, ``[v, 0]``.

    ``table_h``/``table_w``: ``get_rel_pos``'s ``(height, height, head_dim)`` / ``(width, width, head_dim)``
    tables; ``rel_h(q)[i*width + j, k] = q · table_h[i, k]`` (transformers' ``get_decomposed_rel_pos``).
    """
    batch, heads, tokens, head_dim = query.shape
    grid = query.reshape(batch * heads, height, width, head_dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid, table_h).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid, table_w).reshape(batch, heads, tokens, width)
    wide_query = torch.cat([query * scale, rel_h, rel_w], dim=-1)
    codes = _key_position_codes(height, width, key.device, key.dtype)
    wide_key = torch.cat([key, codes.expand(batch, heads, -1, -1)], dim=-1)
    wide_value = F.pad(value, (0, wide_query.shape[-1] - head_dim))
    return wide_query, wide_key, wide_value


def _lean_applies(query: torch.Tensor, dropout: float) -> bool:
    """:class:`_LeanFlashAttention` serves CPU training without dropout (SAM's encoder has none)."""
    return query.device.type == "cpu" and dropout == 0.0 and torch.is_grad_enabled()


def _sdpa_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype ``F.scaled_dot_product_attention`` would compute in (it is on autocast's lower-precision list)."""
    if torch.is_autocast_enabled("cpu") and query.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return query.dtype


class _LeanFlashAttention(torch.autograd.Function):
    """The widened maskless attention on CPU, keeping the unwidened tensors for backward (module docstring).

    forward: ``(batch, heads, tokens, head_dim)`` query/key/value and the rel-pos tables, all in one dtype;
    returns ``(batch, tokens, heads * head_dim)`` (the layout ``proj`` reads).
    """

    @staticmethod
    def forward(ctx, query, key, value, table_h, table_w, scale: float, height: int, width: int):
        batch, heads, tokens, head_dim = query.shape
        with torch.autocast("cpu", enabled=False):
            operands = _widened_operands(query, key, value, table_h, table_w, scale, height, width)
            wide_out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*operands, scale=1.0)
        out = wide_out[..., :head_dim].transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        ctx.save_for_backward(query, key, value, table_h, table_w, out, logsumexp)
        ctx.geometry = (scale, height, width)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved_inputs, out, logsumexp = ctx.saved_tensors
        scale, height, width = ctx.geometry
        batch, heads, tokens, head_dim = saved_inputs[0].shape
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved_inputs, ctx.needs_input_grad)]
        with torch.enable_grad():
            operands = _widened_operands(*inputs, scale, height, width)
        pad = (0, operands[0].shape[-1] - head_dim)

        def widened(t: torch.Tensor) -> torch.Tensor:  # (batch, tokens, heads*head_dim) -> padded (b, h, t, wide)
            return F.pad(t.reshape(batch, tokens, heads, head_dim).transpose(1, 2), pad)

        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            widened(grad_out), *(o.detach() for o in operands), widened(out), logsumexp, 0.0, False, scale=1.0)
        live = [(o, g) for o, g in zip(operands, grads) if o.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in live], wanted, [g for _, g in live], allow_unused=True))
        return (*(next(found) if t.requires_grad else None for t in inputs), None, None, None)


__all__ = ["SamVisionFusedAttention"]
