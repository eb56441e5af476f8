"""Parallelism applied to an MMDiT from outside: activation checkpointing (with offload) and context parallelism.

Context parallelism (CP) shards the joint [txt; img] sequence over a process group and swaps the one function the
blocks call, `cinedit.generator.math.attention`, for Ulysses, ring or hybrid attention; the model's code is unchanged.
Attention shapes: q, k, v are (b, n, l, d) with n heads over l local tokens; outputs are (b, l, n*d).
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd.graph import save_on_cpu
from torch.utils.checkpoint import checkpoint

from cinedit.generator import math as gmath
from cinedit.generator.model import MMDiT

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]
MODES = ("ulysses", "ring", "hybrid")
# Hybrid sub-groups by (CP group ranks, Ulysses size): process groups are costly, and a second local-synchronised
# group over the same ranks would reuse the first one's name.
_SUBGROUPS: dict[tuple[tuple[int, ...], int], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


# Activation checkpointing.


@contextlib.contextmanager
def swap_attention(fn: AttentionFn) -> Iterator[None]:
    """Make the blocks call `fn` as `gmath.attention` inside the context; the previous function comes back after."""
    previous = gmath.attention
    gmath.attention = fn
    try:
        yield
    finally:
        gmath.attention = previous


def _forward_with_attention(attention: AttentionFn, forward: Callable, *args, **kwargs):
    with swap_attention(attention):
        return forward(*args, **kwargs)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # The recompute runs in backward, after a context-parallel swap has ended: pin the attention used now.
    attention, forward = gmath.attention, type(self).forward
    return checkpoint(_forward_with_attention, attention, forward, self, *args, use_reentrant=False, **kwargs)


def _offloaded_forward(self: nn.Module, *args, **kwargs):
    # Non-reentrant checkpoint saves the block's inputs through the saved-tensor hooks active here, so they go to
    # host memory; pinned memory only exists with CUDA.
    with save_on_cpu(pin_memory=torch.cuda.is_available()):
        return _checkpointed_forward(self, *args, **kwargs)


def is_checkpointed(block: nn.Module) -> bool:
    return getattr(block.forward, "__func__", None) in (_checkpointed_forward, _offloaded_forward)


def is_offloaded(block: nn.Module) -> bool:
    return getattr(block.forward, "__func__", None) is _offloaded_forward


def checkpoint_block(block: nn.Module, offload: bool = False) -> bool:
    """Recompute `block`'s activations in backward (non-reentrant); False if it already was, the same way."""
    forward = _offloaded_forward if offload else _checkpointed_forward
    if getattr(block.forward, "__func__", None) is forward:
        return False
    # A bound method in the instance shadows the class's forward and leaves the state-dict keys as they are;
    # copy.deepcopy (EMA) rebinds it to the copy.
    block.forward = types.MethodType(forward, block)
    return True


def apply_activation_checkpointing(
    model: MMDiT, n_double: int | None = None, n_single: int | None = None, offload: bool = False
) -> int:
    """Checkpoint the first n double and the first n single blocks (None: all of them); returns how many now are.

    With `offload` the checkpointed blocks' saved inputs live in (pinned, with CUDA) CPU memory until backward.
    """
    for blocks, n in ((model.double_blocks, n_double), (model.single_blocks, n_single)):
        n = len(blocks) if n is None else n
        if n < 0:
            raise ValueError(f"the number of checkpointed blocks must be >= 0 or None, got {n}")
        for block in list(blocks)[:n]:
            checkpoint_block(block, offload)
    return sum(is_checkpointed(b) for b in [*model.double_blocks, *model.single_blocks])


# Collectives with autograd.


def _world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not dist.is_initialized():
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group")
    return dist.group.WORLD if group is None else group


def _all_to_all(x: Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split x into group-size chunks along scatter_dim, send chunk j to rank j, concat what comes in on gather_dim."""
    chunks = [c.contiguous() for c in x.chunk(dist.get_world_size(group), dim=scatter_dim)]
    out = [torch.empty_like(c) for c in chunks]
    dist.all_to_all(out, chunks, group=group)
    return torch.cat(out, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """`_all_to_all` whose backward is the reverse all-to-all (gather_dim and scatter_dim swapped)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.args = group, gather_dim, scatter_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, *ctx.args), None, None, None


def _seq_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(b, n, l, d) sequence shard -> (b, n/p, p*l, d) head shard of the group's whole sequence."""
    return _AllToAll.apply(x, group, 1, 2)


def _heads_to_seq(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """(b, n/p, p*l, d) head shard -> (b, n, l, d) sequence shard; inverse of `_seq_to_heads`."""
    return _AllToAll.apply(x, group, 2, 1)


def _gather_valid(key_valid: Tensor | None, group: dist.ProcessGroup, b: int, length: int) -> Tensor | None:
    """Every rank's (b, l) key mask concatenated along l in rank order; None stays None (on every rank)."""
    if key_valid is None:
        return None
    # gloo has no bool collectives.
    local = key_valid.to(torch.uint8).expand(b, length).contiguous()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return torch.cat(out, dim=1).bool()


class _GatherSeq(torch.autograd.Function):
    """All-gather equal (b, l, c) shards along l; backward returns only this rank's slice of the gradient.

    Every rank computes the same loss from the gathered tensor, so summing the slices would count it p times.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.rank, ctx.l = dist.get_rank(group), x.shape[1]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[:, ctx.rank * ctx.l : (ctx.rank + 1) * ctx.l], None


def _check_heads(heads: int, size: int) -> None:
    if heads % size:
        raise ValueError(f"Ulysses attention needs the number of heads ({heads}) divisible by its group size ({size})")


# Attention.


def ulysses_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, key_valid: Tensor | None = None
) -> Tensor:
    """Attention over the group's whole sequence by all-to-all from sequence to head shards and back.

    Args:
        q, k, v: (b, n, l, d) this rank's l tokens; the group's sequence is the rank-ordered concatenation.
        key_valid: (l,) or (b, l) bool, False at padding keys; given on every rank of the group or on none.
    """
    group = _world(group)
    b, heads, length, _ = q.shape
    _check_heads(heads, dist.get_world_size(group))
    q, k, v = (_seq_to_heads(t, group) for t in (q, k, v))
    valid = _gather_valid(key_valid, group, b, length)
    mask = None if valid is None else rearrange(valid, "b l -> b 1 1 l")
    x = _heads_to_seq(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), group)
    return rearrange(x, "b n l d -> b l (n d)")


def _shift(x: Tensor, group: dist.ProcessGroup, tag: int) -> tuple[Tensor, list]:
    """Start sending x to the next rank of the ring and receiving the previous rank's; (buffer, requests)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    buffer = torch.empty_like(x)
    send = dist.isend(x.contiguous(), dist.get_global_rank(group, (rank + 1) % size), group=group, tag=tag)
    recv = dist.irecv(buffer, dist.get_global_rank(group, (rank - 1) % size), group=group, tag=tag)
    return buffer, [send, recv]


def _wait(pending: tuple[Tensor, list]) -> Tensor:
    buffer, requests = pending
    for r in requests:
        r.wait()
    return buffer


def _scores(q: Tensor, k: Tensor, valid: Tensor | None) -> Tensor:
    """Scaled float32 scores (b, n, l_q, l_k) with padding keys at -inf; q arrives pre-scaled."""
    s = q @ k.float().transpose(-1, -2)
    return s if valid is None else s.masked_fill(~rearrange(valid, "b l -> b 1 1 l"), -math.inf)


def _finite(lse: Tensor) -> Tensor:
    # A row whose keys are all padding has lse -inf; 0 in its place turns exp(-inf - lse) into 0, not NaN.
    return lse.masked_fill(lse == -math.inf, 0.0)


class _RingAttention(torch.autograd.Function):
    """Ring attention: q stays, (k, v) blocks travel the ring; log-sum-exp merge forward, blockwise backward.

    Backward recomputes each block's probabilities from the saved final log-sum-exp; each block's dk/dv
    accumulator travels with it and arrives back at its owner after one more hop.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, group: dist.ProcessGroup) -> Tensor:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        d = q.shape[-1]
        masks = [None] * size if valid is None else rearrange(valid, "b (p l) -> p b l", p=size)
        qs = q.float() * d**-0.5
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(size):
            pending = _shift(kv, group, tag=0) if step < size - 1 else None
            s = _scores(qs, kv[0], masks[(rank - step) % size])
            block_lse = torch.logsumexp(s, dim=-1)
            block_out = torch.exp(s - _finite(block_lse)[..., None]) @ kv[1].float()
            new_lse = torch.logaddexp(lse, block_lse)
            safe = _finite(new_lse)
            out = out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None]
            lse = new_lse
            if pending is not None:
                kv = _wait(pending)
        ctx.group = group
        ctx.save_for_backward(q, k, v, out, lse, valid)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse, valid = ctx.saved_tensors
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        d = q.shape[-1]
        masks = [None] * size if valid is None else rearrange(valid, "b (p l) -> p b l", p=size)
        scale = d**-0.5
        qs, do = q.float() * scale, grad.float()
        delta = (do * out).sum(dim=-1, keepdim=True)  # (b, n, l, 1): rowsum(dO * O) of the softmax backward
        dq = torch.zeros_like(qs)
        kv = torch.stack([k, v])
        dkv_pending = None
        for step in range(size):
            kv_pending = _shift(kv, group, tag=0) if step < size - 1 else None
            kf, vf = kv[0].float(), kv[1].float()
            p = torch.exp(_scores(qs, kf, masks[(rank - step) % size]) - lse[..., None])
            ds = p * (do @ vf.transpose(-1, -2) - delta)
            dq += ds @ kf
            block_dkv = torch.stack([ds.transpose(-1, -2) @ qs, p.transpose(-1, -2) @ do])
            # The accumulator for this block arrives from the previous rank while the block was computed.
            dkv = block_dkv if dkv_pending is None else _wait(dkv_pending) + block_dkv
            if size > 1:
                dkv_pending = _shift(dkv, group, tag=1)
            if kv_pending is not None:
                kv = _wait(kv_pending)
        if dkv_pending is not None:
            dkv = _wait(dkv_pending)  # the last hop brings this rank's own block home
        return (dq * scale).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def _ring(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, key_valid: Tensor | None) -> Tensor:
    """Ring attention on (b, n, l, d) shards -> (b, n, l, d)."""
    valid = _gather_valid(key_valid, group, q.shape[0], q.shape[2])
    return _RingAttention.apply(q, k, v, valid, group)


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup | None = None, key_valid: Tensor | None = None
) -> Tensor:
    """Non-causal ring attention over the group's whole sequence; arguments as in `ulysses_attention`."""
    x = _ring(q, k, v, _world(group), key_valid)
    return rearrange(x, "b n l d -> b l (n d)")


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Ulysses inside `ulysses_group` (contiguous ranks), ring attention across groups over `ring_group`.

    The ring group holds the ranks with this rank's position in the other Ulysses groups, in sequence order.
    """
    b, heads, length, _ = q.shape
    _check_heads(heads, dist.get_world_size(ulysses_group))
    q, k, v = (_seq_to_heads(t, ulysses_group) for t in (q, k, v))
    valid = _gather_valid(key_valid, ulysses_group, b, length)
    x = _heads_to_seq(_ring(q, k, v, ring_group, valid), ulysses_group)
    return rearrange(x, "b n l d -> b l (n d)")


# The model under context parallelism.


def sum_grads(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """All-reduce (sum) the parameter gradients over the CP group, in place: each rank then holds the full one.

    A parameter no rank has a gradient for keeps None (optimizers skip it); one that only some ranks have gets
    zeros on the others.
    """
    group = _world(group)
    params = [p for p in model.parameters() if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    params = [p for p, h in zip(params, has.tolist()) if h]
    if not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    # One flat buffer: one collective instead of one per parameter.
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        if p.grad is None:
            p.grad = g.view_as(p).clone()
        else:
            p.grad.copy_(g.view_as(p))


class ContextParallel:
    """Runs an unchanged MMDiT with its joint [txt; img] sequence split evenly over a process group.

    Rank r of p holds joint positions [r*m, (r+1)*m), m = ceil((l_txt + l_img) / p): its text part is the overlap
    with [0, l_txt), its image part the rest. The sequence is padded at the end with zero features and ids that
    are masked as keys and dropped from the output; every rank returns the full (b, l_img, c) prediction.

    Gradient convention: every rank of the group computes the same loss from the gathered output; the gather's
    backward passes each rank only its own slice, so a rank's parameter gradients are its part, and their SUM
    over the group (`sum_grads`) equals the single-process gradient. Sum over CP, then average over data ranks.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, mode: str = "ulysses", ulysses_size: int | None = None):
        if mode not in MODES:
            raise ValueError(f"context-parallel mode must be one of {MODES}, got {mode!r}")
        if mode != "hybrid" and ulysses_size is not None:
            raise ValueError(f"ulysses_size is for mode 'hybrid' only, got ulysses_size={ulysses_size} in {mode!r}")
        self.group, self.mode = _world(group), mode
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if mode == "hybrid":
            if ulysses_size is None or ulysses_size < 1 or self.size % ulysses_size:
                raise ValueError(
                    f"mode 'hybrid' needs ulysses_size dividing the group size {self.size}, got {ulysses_size}"
                )
            self.ulysses_group, self.ring_group = self._subgroups(ulysses_size)

    def _subgroups(self, u: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
        """(Ulysses group, ring group) of this rank: contiguous blocks of u ranks, and every u-th rank."""
        ranks = dist.get_process_group_ranks(self.group)
        key = (tuple(ranks), u)
        if key not in _SUBGROUPS:
            # new_group is collective over the world; ranks outside a CP group smaller than the world never get
            # here, so then only the members synchronise (and every member creates the groups in one order).
            local = self.size != dist.get_world_size()
            mine = {}
            for kind, groups in (
                ("ulysses", [ranks[i : i + u] for i in range(0, self.size, u)]),
                ("ring", [ranks[j::u] for j in range(u)]),
            ):
                for members in groups:
                    if local and dist.get_rank() not in members:
                        continue
                    g = dist.new_group(members, use_local_synchronization=local)
                    if dist.get_rank() in members:
                        mine[kind] = g
            _SUBGROUPS[key] = mine["ulysses"], mine["ring"]
        return _SUBGROUPS[key]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """This group's context-parallel attention for (b, n, l, d) shards -> (b, l, n*d)."""
        if self.mode == "ulysses":
            return ulysses_attention(q, k, v, self.group, key_valid)
        if self.mode == "ring":
            return ring_attention(q, k, v, self.group, key_valid)
        return hybrid_attention(q, k, v, self.ulysses_group, self.ring_group, key_valid)

    def forward(
        self,
        model: MMDiT,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        vec: Tensor,
        cond: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """`model(...)` with the sequence sharded over the group; takes and returns full tensors on every rank.

        `guidance` (b,), for a guidance-distilled model, is per sample like `timesteps`: passed on whole.
        """
        l_txt, l_img = txt.shape[1], img.shape[1]
        total = l_txt + l_img
        m = -(-total // self.size)
        pad = m * self.size - total
        start, end = self.rank * m, (self.rank + 1) * m
        t0, t1 = min(start, l_txt), min(end, l_txt)
        # Image rows, the padding after them included; clamped, since a rank may hold only text.
        i0, i1 = max(start, l_txt) - l_txt, max(end, l_txt) - l_txt

        def shard(x: Tensor) -> Tensor:
            return F.pad(x, (0, 0, 0, pad))[:, i0:i1]

        key_valid = None
        if pad:
            key_valid = torch.arange(start, end, device=img.device) < total
        with swap_attention(functools.partial(self.attention, key_valid=key_valid)):
            out = model(
                shard(img),
                shard(img_ids),
                txt[:, t0:t1],
                txt_ids[:, t0:t1],
                timesteps,
                vec,
                None if cond is None else shard(cond),
                guidance=guidance,
            )
        # Left-pad to m rows so the gathered rows are joint positions; the image is then [l_txt, total).
        out = _GatherSeq.apply(F.pad(out, (0, 0, m - out.shape[1], 0)), self.group)
        return out[:, l_txt:total]

    __call__ = forward
