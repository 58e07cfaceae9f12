"""Stage-1 objectives (ITC, ITM hard negatives, ITG mask) and the prefix-LM split, DDP-aware.

Under DDP every rank holds a slice of the global batch. Features are gathered from all ranks (with
gradient for ITC, as LAVIS's ``all_gather_with_grad``), so the in-batch negatives are the global batch.
Hard negatives are sampled for the *global* batch from a generator seeded by the step, and each rank
takes its own rows: one process and N processes with the same global batch draw the same negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (LAVIS's GatherLayer)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack([t.contiguous() for t in grads])
        dist.all_reduce(g)
        return g[rank()]


def gather_batch(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Concatenate each tensor over ranks along dim 0; float tensors that require grad keep it."""
    if world() == 1:
        return tensors
    out = {}
    for name, t in tensors.items():
        if t.requires_grad:
            out[name] = torch.cat(_GatherWithGrad.apply(t), 0)
        else:
            parts = [torch.empty_like(t) for _ in range(world())]
            dist.all_gather(parts, t.contiguous())
            out[name] = torch.cat(parts, 0)
    return out


def token_mean(loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens of the *global* batch (DDP then averages ranks: the result is exact)."""
    n = count.detach().to(torch.float64).reshape(1).clone()
    if world() > 1:
        dist.all_reduce(n)
        return loss_sum * world() / n[0].to(loss_sum.dtype)
    return loss_sum / n[0].to(loss_sum.dtype)


def same_text(ids, att, ids_all, att_all) -> torch.Tensor:
    """[B, B_all] True where two captions are token-identical (not negatives of each other)."""
    a = ids.masked_fill(att == 0, -1)
    b = ids_all.masked_fill(att_all == 0, -1)
    T = max(a.shape[1], b.shape[1])
    a = F.pad(a, (0, T - a.shape[1]), value=-1)
    b = F.pad(b, (0, T - b.shape[1]), value=-1)
    return (a[:, None, :] == b[None, :, :]).all(-1)


def itc_similarities(img, txt, img_all, txt_all, temp):
    """BLIP-2 ITC: similarity = max over the query outputs of cosine(query, [CLS]) / temperature.

    img [B, Q, D] and txt [B, D] are normalised; returns ``sim_i2t`` [B, B_all] and ``sim_t2i`` [B, B_all].
    """
    sim_i2t = torch.einsum("bqd,nd->bnq", img, txt_all).max(-1).values / temp
    sim_t2i = torch.einsum("bd,nqd->bnq", txt, img_all).max(-1).values / temp
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t, sim_t2i, start: int, same: torch.Tensor | None = None, smoothing: float = 0.1):
    """Symmetric InfoNCE with label smoothing; the positive of row b is column ``start + b``.

    ``same`` [B, B_all] marks other pairs with an identical caption: they are neither positive nor
    negative and are left out of the softmax.
    """
    B = sim_i2t.shape[0]
    targets = torch.arange(start, start + B, device=sim_i2t.device)
    if same is not None:
        off = same.clone()
        off[torch.arange(B, device=off.device), targets] = False
        sim_i2t = sim_i2t.masked_fill(off, float("-inf"))
        sim_t2i = sim_t2i.masked_fill(off, float("-inf"))
    # smoothing spreads its mass over the columns left in the softmax only
    return (_smoothed_ce(sim_i2t.float(), targets, smoothing) + _smoothed_ce(sim_t2i.float(), targets, smoothing)) / 2


def _smoothed_ce(logits, targets, smoothing):
    valid = torch.isfinite(logits)
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    smooth = -(logp.masked_fill(~valid, 0).sum(-1) / valid.sum(-1))
    return ((1 - smoothing) * nll + smoothing * smooth).mean()


@torch.no_grad()
def sample_hard_negatives(img_all, txt_all, temp, ids_all, att_all, generator, start: int, B: int):
    """One hard negative text per image and one image per text, drawn from softmax(similarity).

    Sampling is over the global batch (rows ``start:start+B`` are returned), with positives and pairs
    that share the positive's caption given zero weight. Returns indices into the gathered batch:
    ``(neg_text_for_image [B], neg_image_for_text [B])``. ``generator`` is a CPU generator: the draw is
    made on the CPU whatever the device, so it depends on the step's seed only.
    """
    N = img_all.shape[0]
    sim_i2t, sim_t2i = itc_similarities(img_all, txt_all, img_all, txt_all, temp)
    excluded = same_text(ids_all, att_all, ids_all, att_all) | torch.eye(N, dtype=torch.bool, device=img_all.device)
    w_i2t = torch.softmax(sim_i2t.float(), 1).masked_fill(excluded, 0) + 1e-12 * (~excluded)
    w_t2i = torch.softmax(sim_t2i.float(), 1).masked_fill(excluded, 0) + 1e-12 * (~excluded)
    all_alone = excluded.all(1)  # a batch where every caption is the same: no negative exists
    w_i2t[all_alone] = w_t2i[all_alone] = 1.0
    neg_txt = torch.multinomial(w_i2t.cpu(), 1, generator=generator)[:, 0].to(img_all.device)
    neg_img = torch.multinomial(w_t2i.cpu(), 1, generator=generator)[:, 0].to(img_all.device)
    return neg_txt[start:start + B], neg_img[start:start + B]


def itg_mask(num_queries: int, att: torch.Tensor) -> torch.Tensor:
    """[B, Q+T, Q+T] bool mask for ITG: queries see queries only; text sees all queries + earlier text."""
    B, T = att.shape
    L = num_queries + T
    mask = torch.zeros(B, L, L, dtype=torch.bool, device=att.device)
    mask[:, :num_queries, :num_queries] = True
    mask[:, num_queries:, :num_queries] = True
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=att.device))
    mask[:, num_queries:, num_queries:] = causal & att.bool()[:, None, :]
    return mask


def unimodal_mask(num_queries: int, att: torch.Tensor) -> torch.Tensor:
    """[B, Q+T, Q+T] bool mask for ITC: queries and text do not see each other."""
    B, T = att.shape
    L = num_queries + T
    mask = torch.zeros(B, L, L, dtype=torch.bool, device=att.device)
    mask[:, :num_queries, :num_queries] = True
    mask[:, num_queries:, num_queries:] = att.bool()[:, None, :].expand(-1, T, -1)
    return mask


def prefix_split(ids, att, split, eos_id: int, pad_id: int):
    """Split T5-style ``ids`` (caption words + </s>, right-padded) by the random integers ``split``.

    Returns encoder ids (prefix + </s>), their mask, and decoder labels (rest + </s>, -100 padded), on the
    device of ``ids`` (the split is worked out on the CPU: it is a loop over a few short rows).
    """
    device = ids.device
    ids, att = ids.cpu(), att.cpu()
    split = split.cpu() if isinstance(split, torch.Tensor) else split
    B = ids.shape[0]
    lengths = att.sum(1)  # includes </s>
    enc, dec = [], []
    for b in range(B):
        words = ids[b, : lengths[b] - 1].tolist()
        r = int(split[b]) if split is not None else 0
        k = r // 2 % len(words) if r % 2 else 0  # half the samples: no prefix (plain captioning)
        enc.append(words[:k] + [eos_id])
        dec.append(words[k:] + [eos_id])
    Te, Td = max(map(len, enc)), max(map(len, dec))
    enc_ids = torch.full((B, Te), pad_id, dtype=ids.dtype)
    enc_att = torch.zeros(B, Te, dtype=att.dtype)
    labels = torch.full((B, Td), -100, dtype=ids.dtype)
    for b in range(B):
        enc_ids[b, : len(enc[b])] = torch.tensor(enc[b])
        enc_att[b, : len(enc[b])] = 1
        labels[b, : len(dec[b])] = torch.tensor(dec[b])
    return enc_ids.to(device), enc_att.to(device), labels.to(device)
