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
        scale = self.scale
        if self.use_rel_pos:
            rel_h, rel_w = self._rel_pos_terms(query, height, width)
            query = torch.cat([query * self.scale, rel_h, rel_w], dim=-1)
            codes = _key_position_codes(height, width, key.device, key.dtype)
            key = torch.cat([key, codes.expand(batch, heads, -1, -1)], dim=-1)
            value = F.pad(value, (0, query.shape[-1] - head_dim))
            scale = 1.0
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale)[..., :head_dim]
        out = out.transpose(1, 2).reshape(batch, height, width, heads * head_dim)
        return self.proj(out), None

    def _rel_pos_terms(self, query: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The row and column bias terms ``(batch, heads, tokens, height)`` and ``(..., width)`` of each query."""
        batch, heads, tokens, head_dim = query.shape
        grid = query.reshape(batch * heads, height, width, head_dim)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid, self.get_rel_pos(height, height, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid, self.get_rel_pos(width, width, self.rel_pos_w))
        return rel_h.reshape(batch, heads, tokens, height), rel_w.reshape(batch, heads, tokens, width)


__all__ = ["SamVisionFusedAttention"]
