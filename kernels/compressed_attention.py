"""The dense attentions of a compressed-key layer (DeepSeek-V4): MQA, one key head shared by all query heads, K = V.

    window:      out_t = sum_{t - window < s <= t} softmax_s(scale q_t . kv_s) kv_s        over raw tokens
    compressed:  out_t = sum_{w < (t + 1) // ratio} softmax_w(scale q_t . c_w) c_w         over compressed entries

per head, each with its natural-log LSE (-inf and out 0 for a row without keys). `merge_with_sink` joins two
such parts and a per-head sink logit into the one softmax V4 takes over [window keys, compressed keys, sink].
Shapes: q [B, T, H, D], kv [B, T, D], compressed [B, S, D] -> out [B, T, H, D] (q's dtype), lse [B, H, T] fp32.

Plain PyTorch in chunks of query rows (a window row reads only its chunk's span of keys): memory
O(B * H * chunk * (chunk + window)) and O(B * H * chunk * S), never B * H * T * T. The sparse part (a row's
top-k compressed entries) is `kernels.sparse_attention`'s gathered MQA, whose kv may hold S entries.
"""
from __future__ import annotations

import torch

from kernels.reference import CHUNK_ELEMENTS, allowed_keys


def _attend(q: torch.Tensor, kv: torch.Tensor, scale: float, allowed: torch.Tensor):
    """q [B, R, H, D] against kv [B, N, D] where allowed [B, R, N] -> (out [B, R, H, D] fp32, lse [B, H, R] fp32)."""
    scores = torch.einsum("bthd,bsd->bhts", q.float(), kv.float()) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhts,bsd->bthd", probs, kv.float()), lse


def window_attention(q: torch.Tensor, kv: torch.Tensor, scale: float, window: int, chunk_size: int | None = None):
    """(out [B, T, H, D], lse [B, H, T]) of sliding-window MQA: row t sees the raw keys t - window < s <= t."""
    B, T, H, _ = q.shape
    chunk = chunk_size or max(1, min(T, CHUNK_ELEMENTS // max(1, B * H * (T + window))))
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        lo = max(0, start - window + 1)
        t = torch.arange(start, end, device=q.device)[:, None]
        s = torch.arange(lo, end, device=q.device)[None, :]
        allowed = ((s <= t) & (s > t - window)).expand(B, -1, -1)
        o, lse[:, :, start:end] = _attend(q[:, start:end], kv[:, lo:end], scale, allowed)
        out[:, start:end] = o.to(q.dtype)
    return out, lse


def compressed_attention(q: torch.Tensor, compressed: torch.Tensor, scale: float, ratio: int,
                         chunk_size: int | None = None):
    """(out [B, T, H, D], lse [B, H, T]) of MQA over every visible compressed entry: w < (t + 1) // ratio."""
    B, T, H, _ = q.shape
    S = compressed.shape[1]
    if S != T // ratio:
        raise ValueError(f"{S} compressed entries for {T} tokens at ratio {ratio}: expected T // ratio = {T // ratio}")
    chunk = chunk_size or max(1, min(T, CHUNK_ELEMENTS // max(1, B * H * max(S, 1))))
    out = torch.empty_like(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        allowed = allowed_keys(B, T, rows, None, q.device, ratio=ratio)
        o, lse[:, :, rows] = _attend(q[:, rows], compressed, scale, allowed)
        out[:, rows] = o.to(q.dtype)
    return out, lse


def merge_with_sink(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
                    sinks: torch.Tensor) -> torch.Tensor:
    """The softmax over [keys of a, keys of b, sink] applied to the values, from each part's own output
    [B, T, H, D] and LSE [B, H, T] and the per-head sink logits [H]: (o_a e^lse_a + o_b e^lse_b) /
    (e^lse_a + e^lse_b + e^s_h), in fp32, returned in out_a's dtype."""
    sink = sinks.float()[None, :, None].expand_as(lse_a)
    top = torch.maximum(torch.maximum(lse_a, lse_b), sink)
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b + torch.exp(sink - top)
    w_a, w_b = ((w / total).transpose(1, 2).unsqueeze(-1) for w in (w_a, w_b))  # [B, T, H, 1]
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype)
