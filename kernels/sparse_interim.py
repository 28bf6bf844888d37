"""INTERIM (replaced at merge by the sparse kernels' reference)."""
import torch
from kernels.reference import document_starts


def sparse_mqa_attention(q, kv, topk_indices, scale, v_dim, *, prob_out=None, prob_weight=1.0, cu_seqlens=None):
    B, T, H, Dk = q.shape
    K = topk_indices.shape[-1]
    idx = topk_indices.long()
    t = torch.arange(T, device=q.device)[None, :, None]
    start = document_starts(cu_seqlens, B, T, q.device)[..., None]
    valid = (idx >= start) & (idx <= t)
    g = torch.gather(kv.float(), 1, idx.clamp(min=0).reshape(B, T * K, 1).expand(-1, -1, Dk)).view(B, T, K, Dk)
    s = torch.einsum("bthd,btkd->bhtk", q.float(), g) * scale
    s = s.masked_fill(~valid[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhtk,btkd->bthd", p, g[..., :v_dim]).to(q.dtype)
    if prob_out is not None:
        prob_out.add_(p.mean(1) * prob_weight)
    return out, lse


def sparse_centroid_kl(index_q, index_k, index_w, target, topk_indices, *, cu_seqlens=None):
    B, T, HI, D = index_q.shape
    K = topk_indices.shape[-1]
    idx = topk_indices.long()
    t = torch.arange(T, device=index_q.device)[None, :, None]
    start = document_starts(cu_seqlens, B, T, index_q.device)[..., None]
    valid = (idx >= start) & (idx <= t)
    g = torch.gather(index_k.float(), 1, idx.clamp(min=0).reshape(B, T * K, 1).expand(-1, -1, D)).view(B, T, K, D)
    s = torch.einsum("bthd,btkd->bthk", index_q.float(), g).relu()
    logits = torch.einsum("bthk,bth->btk", s, index_w.float()).masked_fill(~valid, float("-inf"))
    logq = torch.log_softmax(logits, -1).masked_fill(~valid, 0.0)
    tgt = target.masked_fill(~valid, 0.0)
    return (torch.xlogy(tgt, tgt) - tgt * logq).sum() / (B * T)
