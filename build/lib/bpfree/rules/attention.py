"""nn.MultiheadAttention under a layer rule: its packed Q/K/V projection made a real layer.

nn.MultiheadAttention hands `in_proj_weight` (Q, K and V stacked, (3E, E)) and
`out_proj.weight` to a functional kernel, so a rule that swaps Linear classes never sees
them and they would silently keep plain backprop. While a rule is applied, each attention
module gets

- `in_proj`: a Linear whose `weight` and `bias` *are* the module's `in_proj_weight` and
  `in_proj_bias` (the same Parameter objects, read through properties, so the optimizer,
  the state_dict keys and the checkpoint stay what they were); the rule converts it like
  any Linear, so FA draws B like the packed weight (PyTorch initialises it the same way),
  KP and WM keep their B on it, DFA and BackMAN treat its 3E outputs as neurons;
- a forward that runs the projections as module calls (`in_proj`, `out_proj`) and the
  attention itself as PyTorch does: scaled dot product, additive / boolean masks, key
  padding, dropout on the weights, averaged weights when asked.

`handle.remove()` takes both away. Modules with separate key/value sizes, bias_kv or
add_zero_attn are left alone and named in the conversion report.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def supported(mha: nn.MultiheadAttention) -> str | None:
    """Why this attention module cannot be converted, or None."""
    if not mha._qkv_same_embed_dim:
        return "separate key/value sizes (kdim/vdim)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


class PackedInProjection(nn.Linear):
    """The Q/K/V rows of an attention module as a Linear; it owns no Parameters of its own."""

    def __init__(self, mha: nn.MultiheadAttention):  # noqa: D107 - no nn.Linear.__init__: no new weights
        nn.Module.__init__(self)
        object.__setattr__(self, "_bpfree_attention", mha)  # not a submodule: no cycle in modules()
        self.in_features, self.out_features = mha.embed_dim, 3 * mha.embed_dim

    @property
    def weight(self) -> nn.Parameter:
        return self._bpfree_attention.in_proj_weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self._bpfree_attention.in_proj_bias


def _as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may not attend) or a float one, as an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class RuleMultiheadAttention(nn.MultiheadAttention):
    """The class an attention module wears while a rule is applied (see the module docstring)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # Batch first inside, whatever the module's layout: rules that read per-sample rows
        # (DFA's output error, LFNN's worker read-outs) see (B, T, features) as for any Linear.
        unbatched = query.dim() == 2  # (T, E) whatever batch_first says, as PyTorch reads it
        self_attention = query is key and key is value
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, dim = query.shape
        source = key.shape[1]
        heads, head_dim, e = self.num_heads, self.head_dim, self.embed_dim
        if self_attention:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:  # cross-attention: one call on the three inputs stacked along the sequence, each
            # reading its own rows (so a rule's per-call terms, e.g. KP's decay, count once)
            projected = self.in_proj(torch.cat([query, key, value], dim=1))
            q, k, v = (projected[:, :length, :e], projected[:, length:length + source, e:2 * e],
                       projected[:, length + source:, 2 * e:])

        def split(t, n):  # (B, n, E) -> (B, H, n, d)
            return t.reshape(batch, n, heads, head_dim).transpose(1, 2)

        q, k, v = split(q, length), split(k, source), split(v, source)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        mask = _as_additive(attn_mask, scores.dtype)
        if mask is not None:
            scores = scores + (mask.view(batch, heads, length, source) if mask.dim() == 3 else mask)
        padding = _as_additive(key_padding_mask, scores.dtype)
        if padding is not None:
            scores = scores + padding.view(batch, 1, 1, source)
        weights = torch.softmax(scores, dim=-1)
        dropped = F.dropout(weights, p=self.dropout, training=self.training) if self.dropout > 0 else weights
        out = self.out_proj((dropped @ v).transpose(1, 2).reshape(batch, length, dim))  # (B, T, E)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights.squeeze(0) if unbatched else weights)


def open_attention(model: nn.Module) -> tuple[list[nn.MultiheadAttention], dict[str, str]]:
    """Give every supported attention module its `in_proj` layer and the rule forward;
    returns the modules changed and {qualified name: why not} for those left alone."""
    opened, left = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or isinstance(module, RuleMultiheadAttention):
            continue
        why = supported(module)
        if why:
            left[name] = why
            continue
        module.in_proj = PackedInProjection(module)
        module._bpfree_attention_class = type(module)
        module.__class__ = _rule_class(type(module))
        opened.append(module)
    return opened, left


def close_attention(modules: list[nn.MultiheadAttention]) -> None:
    """Undo open_attention exactly: the original class, no `in_proj`."""
    for module in modules:
        module.__class__ = module._bpfree_attention_class
        del module._bpfree_attention_class
        del module._modules["in_proj"]


_RULE_CLASSES: dict[type, type] = {}


def _rule_class(cls: type) -> type:
    if cls is nn.MultiheadAttention:
        return RuleMultiheadAttention
    if cls not in _RULE_CLASSES:  # a user's subclass keeps its own methods other than forward
        _RULE_CLASSES[cls] = type(f"Rule{cls.__name__}", (RuleMultiheadAttention, cls), {"__module__": __name__})
    return _RULE_CLASSES[cls]
