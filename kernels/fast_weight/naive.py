"""PyTorch reference of the Tensor Cache memory (L2): pure functions over explicit, fixed-shape state tensors.

Two families, both fed only by the key/value pairs that leave the exact window (L1):

* **paper** (Swain et al., arXiv 2605.22884): one fast-weight matrix `A` `[B, Hkv, D, Dv]` per KV head, written
  `A <- lam * A + eta * w * k_hat^T u` with `k_hat = k / |k|` and `u = v` (outer rule) or `u = v - k_hat A`
  (delta rule), read raw: `r = q A`. [`fast_weight_write`] / [`fast_weight_read`].
* **learned**: a linear-attention memory with a learned feature map `phi` (Hedgehog / LoLCATs): per KV head
  `S = sum_i lam^(t-i) eta phi(k_i) v_i^T` and `z = sum_i lam^(t-i) eta phi(k_i)`, read `phi(q) S / phi(q) z` with
  mass `phi(q) z` in units of the window's softmax mass. [`learned_write`] / [`learned_read`].
* **training-free**: decayed moments of the evicted pairs, read as an estimate of the softmax terms the window no
  longer holds (`sum_i exp(s.k_i) v_i` and `sum_i exp(s.k_i)`, with `s = scaling * q`), so the memory can join the
  window's softmax through a shared log-sum-exp. [`moment_write`] / [`moment_read`] / [`merge_softmax`].

Every pair carries a weight `w` (0 for sinks and padding, which must not enter the memory) and every pair ticks the
decay once, so the state after `m` pairs is `lam^m * state + sum_j lam^(m-1-j) * w_j * x_j` whatever the chunking.
A chunk of queries reads the memory at per-query *prefixes* of the chunk's evicted pairs (`prefix[t]` pairs have
been written when query `t` reads), which makes one chunked call equal to token-by-token decoding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "LearnedMemory",
    "LearnedState",
    "MomentState",
    "decay_matrix",
    "fast_weight_read",
    "fast_weight_write",
    "learned_features",
    "learned_read",
    "learned_state",
    "learned_write",
    "merge_softmax",
    "moment_read",
    "moment_state",
    "moment_write",
    "window_attention_lse",
]


class MomentState(NamedTuple):
    """Decayed sums over the evicted pairs of one layer (training-free memory). All float32.

    `count` `[B, H]` (sum of weights), `key_sum` `[B, H, D]`, `value_sum` `[B, H, Dv]`, `value_key` `[B, H, Dv, D]`
    (sum of `v k^T`, or `None` for the `"mean"` memory), `key_key` `[B, H, D, D]` (sum of `k k^T`, only for the
    `"gaussian"` memory, else `None`).
    """

    count: torch.Tensor
    key_sum: torch.Tensor
    value_sum: torch.Tensor
    value_key: torch.Tensor | None
    key_key: torch.Tensor | None


def moment_state(batch: int, heads: int, head_dim: int, value_dim: int, memory: str, device=None) -> MomentState:
    """An empty [`MomentState`] for `memory` in `("mean", "moment", "gaussian")`."""
    zeros = lambda *shape: torch.zeros(batch, heads, *shape, dtype=torch.float32, device=device)  # noqa: E731
    return MomentState(
        zeros(),
        zeros(head_dim),
        zeros(value_dim),
        zeros(value_dim, head_dim) if memory in ("moment", "gaussian") else None,
        zeros(head_dim, head_dim) if memory == "gaussian" else None,
    )


def decay_matrix(prefix: torch.Tensor, weights: torch.Tensor, log_decay: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Weights of the chunk's pairs and of the old state as seen by each query.

    Args:
        prefix (`torch.LongTensor` of shape `[q]`): Pairs written (`0 .. m`) when each query reads.
        weights (`torch.Tensor` of shape `[B, m]`): Weight of each pair (0 = not written, the decay still ticks).
        log_decay (`torch.Tensor` of shape `[H]`): `log(lam)` per head (0 for no decay).

    Returns:
        `(pairs, old)`: `pairs` `[B, H, q, m]` = `lam^(prefix - 1 - j) * w_j` for `j < prefix`, else 0;
        `old` `[1, H, q]` = `lam^prefix`.
    """
    m = weights.shape[-1]
    j = torch.arange(m, device=weights.device)
    age = (prefix.view(-1, 1) - 1 - j).float()  # [q, m]
    pairs = torch.exp(log_decay.view(-1, 1, 1) * age.clamp(min=0))  # [H, q, m]
    pairs = torch.where(age >= 0, pairs, 0.0).unsqueeze(0) * weights.float()[:, None, None, :]  # [B, H, q, m]
    old = torch.exp(log_decay.view(1, -1, 1) * prefix.float().view(1, 1, -1))  # [1, H, q]
    return pairs, old


# ---- training-free memory -----------------------------------------------------------------------------------------
def moment_write(
    state: MomentState, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, log_decay: torch.Tensor
) -> MomentState:
    """Add `m` evicted pairs to the moments: `x <- lam^m x + sum_j lam^(m-1-j) w_j x_j` for every sum.

    Args:
        state (`MomentState`): The moments before the pairs.
        keys (`torch.Tensor` of shape `[B, H, m, D]`): Evicted keys (RoPE applied), oldest first.
        values (`torch.Tensor` of shape `[B, H, m, Dv]`): Evicted values.
        weights (`torch.Tensor` of shape `[B, m]`): 1 for a real pair, 0 for a sink or padding.
        log_decay (`torch.Tensor` of shape `[H]`): `log(lam)` per head.

    Returns:
        `MomentState`: the moments after the pairs (new tensors; `state` is not modified).
    """
    m = keys.shape[-2]
    prefix = torch.tensor([m], device=keys.device)
    pairs, old = decay_matrix(prefix, weights, log_decay)
    p = pairs[:, :, 0]  # [B, H, m]
    a = old[:, :, 0]  # [1, H]
    k, v = keys.float(), values.float()
    pk = p.unsqueeze(-1) * k  # [B, H, m, D]
    return MomentState(
        a * state.count + p.sum(-1),
        a[..., None] * state.key_sum + pk.sum(-2),
        a[..., None] * state.value_sum + (p.unsqueeze(-1) * v).sum(-2),
        None if state.value_key is None else a[..., None, None] * state.value_key + v.transpose(-1, -2) @ pk,
        None if state.key_key is None else a[..., None, None] * state.key_key + k.transpose(-1, -2) @ pk,
    )


def moment_read(
    state: MomentState,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    prefix: torch.Tensor,
    log_decay: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's estimate of the softmax terms of the evicted pairs it would have seen.

    With `s = scaling * q`, `n` the (decayed) count, `mu`, `mu_v` the mean key and value, `C = E[v k^T] - mu_v mu^T`
    and `S = E[k k^T] - mu mu^T` over the first `prefix[t]` pairs of the chunk on top of `state`:

    * `"mean"`:     `log Z = log n + s.mu`,                   `out = mu_v`
    * `"moment"`:   `log Z = log n + s.mu`,                   `out = mu_v + C s`  (first-order expansion of exp)
    * `"gaussian"`: `log Z = log n + s.mu + s^T S s / 2`,     `out = mu_v + C s`  (exact for Gaussian keys/values)

    Args:
        state (`MomentState`): The moments before the chunk.
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): Queries; `Hq` a multiple of `H` (GQA).
        keys (`torch.Tensor` of shape `[B, H, m, D]`), values (`[B, H, m, Dv]`), weights (`[B, m]`): The chunk's
            evicted pairs, oldest first.
        prefix (`torch.LongTensor` of shape `[q]`): Pairs of the chunk written when each query reads.
        log_decay (`torch.Tensor` of shape `[H]`): `log(lam)` per head.
        scaling (`float`): The attention's multiplier of `q.k`.

    Returns:
        `(out, lse)`: `out` `[B, Hq, q, Dv]` float32, the memory's softmax-weighted value; `lse` `[B, Hq, q]`, the log
        of its softmax denominator (`-inf` where the memory is empty).
    """
    batch, hq, q, d = query.shape
    h = keys.shape[1]
    g = hq // h
    s = query.float().view(batch, h, g, q, d) * scaling  # [B, H, g, q, D]
    k, v = keys.float(), values.float()
    pairs, old = decay_matrix(prefix, weights, log_decay)  # [B, H, q, m], [1, H, q]
    count = old * state.count[..., None] + pairs.sum(-1)  # [B, H, q]
    key_sum = old[..., None] * state.key_sum[:, :, None] + pairs @ k  # [B, H, q, D]
    value_sum = old[..., None] * state.value_sum[:, :, None] + pairs @ v  # [B, H, q, Dv]
    safe = count.clamp(min=1e-30)[..., None]
    mu, mu_v = key_sum / safe, value_sum / safe
    s_mu = (s * mu[:, :, None]).sum(-1)  # [B, H, g, q]
    lse = torch.log(count.clamp(min=1e-30))[:, :, None] + s_mu
    out = mu_v[:, :, None].expand(-1, -1, g, -1, -1)  # [B, H, g, q, Dv]
    if state.value_key is not None:
        dots = s @ k.transpose(-1, -2)[:, :, None]  # [B, H, g, q, m]
        weighted = pairs[:, :, None] * dots
        vk_s = old[:, :, None, :, None] * (s @ state.value_key.transpose(-1, -2)[:, :, None]) + weighted @ v[:, :, None]
        out = out + vk_s / safe[:, :, None] - mu_v[:, :, None] * s_mu[..., None]
        if state.key_key is not None:
            kk_s = old[:, :, None] * ((s @ state.key_key[:, :, None]) * s).sum(-1) + (weighted * dots).sum(-1)
            variance = kk_s / count.clamp(min=1e-30)[:, :, None] - s_mu**2
            lse = lse + 0.5 * variance.clamp(min=0)
    empty = (count <= 0)[:, :, None]  # [B, H, 1, q]
    lse = torch.where(empty, float("-inf"), lse)
    out = torch.where(empty[..., None], 0.0, out)
    return out.reshape(batch, hq, q, -1), lse.reshape(batch, hq, q)


def window_attention_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the visible keys, float32, with the log of its denominator.

    Args:
        query (`[B, Hq, q, D]`), key (`[B, Hkv, K, D]`), value (`[B, Hkv, K, Dv]`): As for window attention.
        visible (`torch.BoolTensor` of shape `[B, q, K]`): Which keys each query sees.
        scaling (`float`): Multiplier of the dot products.
        softcap (`float`, *optional*): Logit soft-capping.

    Returns:
        `(out, lse)`: `[B, Hq, q, Dv]` float32 and `[B, Hq, q]` (`-inf` for a query that sees no key; `out` is 0).
    """
    g = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(g, dim=1)  # [B, Hq, K, D]
    v = value.float().repeat_interleave(g, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # [B, Hq, q, K]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)), nan=0.0)
    return torch.matmul(probs, v), lse


def merge_softmax(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two disjoint key sets: `(Z_a out_a + Z_b out_b) / (Z_a + Z_b)` with `Z = exp(lse)`.

    Args:
        out_a, out_b (`torch.Tensor` of shape `[..., Dv]`): Each part's normalised output.
        lse_a, lse_b (`torch.Tensor` of shape `[...]`): Each part's log-denominator (`-inf` for an empty part).

    Returns:
        `(out, lse)` of the union.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    lse_safe = torch.where(finite, lse, 0.0)
    wa = torch.where(finite, torch.exp(lse_a - lse_safe), 0.0).unsqueeze(-1)
    wb = torch.where(finite, torch.exp(lse_b - lse_safe), 0.0).unsqueeze(-1)
    return wa * out_a + wb * out_b, lse


# ---- paper mode ---------------------------------------------------------------------------------------------------
def _unit(keys: torch.Tensor) -> torch.Tensor:
    return keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp(min=1e-6)


def fast_weight_write(
    state: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    decay: torch.Tensor,
    write_rate: torch.Tensor,
    rule: str,
) -> torch.Tensor:
    """Write `m` evicted pairs into the fast weights, oldest first: `A <- lam A + eta w k_hat^T u`.

    The outer rule (`u = v`) uses the weighted-sum scan `A <- lam^m A + eta sum_j lam^(m-1-j) w_j k_hat_j^T v_j`
    (one matmul, exact: no chunk-mean cross terms); the delta rule (`u = v - k_hat A`) is sequential.

    Args:
        state (`torch.Tensor` of shape `[B, H, D, Dv]`): `A` before the pairs, float32.
        keys (`[B, H, m, D]`), values (`[B, H, m, Dv]`), weights (`[B, m]`): The evicted pairs.
        decay (`torch.Tensor` of shape `[H]`): `lam` per head, in (0, 1].
        write_rate (`torch.Tensor` of shape `[H]`): `eta` per head.
        rule (`str`): `"outer"` or `"delta"`.

    Returns:
        `torch.Tensor` of shape `[B, H, D, Dv]`: `A` after the pairs.
    """
    k_hat, v = _unit(keys), values.float()
    eta = write_rate.float().view(1, -1, 1, 1)
    if rule == "outer":
        m = keys.shape[-2]
        pairs, old = decay_matrix(torch.tensor([m], device=keys.device), weights, torch.log(decay.float()))
        pk = pairs[:, :, 0].unsqueeze(-1) * k_hat  # [B, H, m, D]
        return old[:, :, 0, None, None] * state + eta * (pk.transpose(-1, -2) @ v)
    lam = decay.float().view(1, -1, 1, 1)
    w = weights.float()
    for j in range(keys.shape[-2]):
        kj = k_hat[:, :, j : j + 1]  # [B, H, 1, D]
        u = v[:, :, j : j + 1] - kj @ state  # [B, H, 1, Dv]
        state = lam * state + eta * w[:, j].view(-1, 1, 1, 1) * (kj.transpose(-1, -2) @ u)
    return state


def fast_weight_read(
    state: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    prefix: torch.Tensor,
    decay: torch.Tensor,
    write_rate: torch.Tensor,
    rule: str,
) -> torch.Tensor:
    """The raw read `r_t = q_t A_t`, `A_t` being `A` after the first `prefix[t]` pairs of the chunk.

    Args:
        state (`torch.Tensor` of shape `[B, H, D, Dv]`): `A` before the chunk.
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): Queries (GQA: `Hq` a multiple of `H`).
        keys, values, weights, decay, write_rate, rule: As for [`fast_weight_write`].
        prefix (`torch.LongTensor` of shape `[q]`): Pairs written when each query reads, non-decreasing.

    Returns:
        `torch.Tensor` of shape `[B, Hq, q, Dv]`, float32.
    """
    batch, hq, q, d = query.shape
    h = keys.shape[1]
    g = hq // h
    qf = query.float().view(batch, h, g, q, d)
    if rule == "outer":  # parallel form of the weighted-sum scan
        pairs, old = decay_matrix(prefix, weights, torch.log(decay.float()))  # [B, H, q, m], [1, H, q]
        k_hat = _unit(keys)
        eta = write_rate.float().view(1, -1, 1, 1, 1)
        dots = qf @ k_hat.transpose(-1, -2)[:, :, None]  # [B, H, g, q, m]
        out = old[:, :, None, :, None] * (qf @ state[:, :, None])
        out = out + eta * ((pairs[:, :, None] * dots) @ values.float()[:, :, None])
        return out.reshape(batch, hq, q, -1)
    out = qf.new_zeros(batch, h, g, q, state.shape[-1])
    for j in range(keys.shape[-2] + 1):  # read the queries at prefix j, then write pair j
        rows = (prefix == j).nonzero().flatten()
        if rows.numel():
            out[:, :, :, rows] = qf[:, :, :, rows] @ state[:, :, None]
        if j < keys.shape[-2]:
            state = fast_weight_write(
                state, keys[:, :, j : j + 1], values[:, :, j : j + 1], weights[:, j : j + 1], decay, write_rate, rule
            )
    return out.reshape(batch, hq, q, -1)


# ---- learned memory -----------------------------------------------------------------------------------------------
class LearnedMemory(NamedTuple):
    """The fitted parameters of one layer's learned memory (float32).

    `q_weight` `[Hq, D, F]` and `q_bias` `[Hq, F]` (query feature map, per query head), `k_weight` `[H, D, F]` and
    `k_bias` `[H, F]` (key feature map, per KV head), `log_decay` `[H]` (`log lam`) and `write_rate` `[H]` (`eta`).
    The feature map is `phi(x) = [softmax(x W + b), softmax(-(x W + b))]`, `2F` features (Hedgehog).
    """

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor
    log_decay: torch.Tensor
    write_rate: torch.Tensor


class LearnedState(NamedTuple):
    """Decayed sums of the learned memory (float32): `values` `[B, H, 2F, Dv]` (`sum eta phi(k) v^T`) and `mass`
    `[B, H, 2F]` (`sum eta phi(k)`)."""

    values: torch.Tensor
    mass: torch.Tensor


def learned_state(batch: int, heads: int, features: int, value_dim: int, device=None) -> LearnedState:
    """An empty [`LearnedState`] with `features` (`2F`) feature dimensions."""
    zeros = lambda *shape: torch.zeros(batch, heads, *shape, dtype=torch.float32, device=device)  # noqa: E731
    return LearnedState(zeros(features, value_dim), zeros(features))


def learned_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map `[softmax(x W + b), softmax(-(x W + b))]` per head.

    Args:
        x (`torch.Tensor` of shape `[B, H, n, D]`): Queries or keys (RoPE applied).
        weight (`torch.Tensor` of shape `[H, D, F]`), bias (`[H, F]`): The head's map.

    Returns:
        `torch.Tensor` of shape `[B, H, n, 2F]`, float32, positive, each half summing to 1.
    """
    proj = torch.einsum("bhnd,hdf->bhnf", x.float(), weight.float()) + bias.float()[:, None]
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)


def learned_write(
    state: LearnedState, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, memory: LearnedMemory
) -> LearnedState:
    """Add `m` evicted pairs: `x <- lam^m x + eta sum_j lam^(m-1-j) w_j x_j` for `x = phi(k) v^T` and `phi(k)`.

    Args:
        state (`LearnedState`): The sums before the pairs.
        keys (`torch.Tensor` of shape `[B, H, m, D]`), values (`[B, H, m, Dv]`), weights (`[B, m]`): The evicted
            pairs, oldest first (weight 0 for a sink or padding; the decay still ticks).
        memory (`LearnedMemory`): The layer's parameters.

    Returns:
        `LearnedState`: the sums after the pairs (new tensors).
    """
    features = learned_features(keys, memory.k_weight, memory.k_bias)
    return learned_write_features(state, features, values, weights, memory.log_decay, memory.write_rate)


def learned_read(
    state: LearnedState,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    prefix: torch.Tensor,
    memory: LearnedMemory,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's read of the learned memory after the first `prefix[t]` of the chunk's pairs.

    Args:
        state (`LearnedState`): The sums before the chunk.
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): Queries; `Hq` a multiple of `H` (GQA).
        keys (`[B, H, m, D]`), values (`[B, H, m, Dv]`), weights (`[B, m]`): The chunk's evicted pairs.
        prefix (`torch.LongTensor` of shape `[q]`): Pairs of the chunk written when each query reads.
        memory (`LearnedMemory`): The layer's parameters.

    Returns:
        `(out, log_mass)`: `out` `[B, Hq, q, Dv]` float32 = `phi(q) S / phi(q) z`, and `log_mass` `[B, Hq, q]` =
        `log(phi(q) z)`, the memory's softmax mass relative to the window's (`-inf` where the memory is empty).
        Merge as `merge_softmax(out_w, lse_w, out, lse_w + log_mass)`.
    """
    query_features = learned_features(query, memory.q_weight, memory.q_bias)  # [B, Hq, q, 2F]
    features = learned_features(keys, memory.k_weight, memory.k_bias)  # [B, H, m, 2F]
    return learned_read_features(
        state, query_features, features, values, weights, prefix, memory.log_decay, memory.write_rate
    )


# ---- learned memory, from features (the twins of the Triton kernels in learned.py) ---------------------------------
def learned_write_features(
    state: LearnedState,
    features: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    log_decay: torch.Tensor,
    write_rate: torch.Tensor,
) -> LearnedState:
    """[`learned_write`] with the keys' features given: `x <- lam^m x + eta sum_j lam^(m-1-j) w_j x_j`.

    Args:
        state (`LearnedState`): The sums before the pairs.
        features (`torch.Tensor` of shape `[B, H, m, 2F]`): `phi(k)` of the evicted keys ([`learned_features`]).
        values (`torch.Tensor` of shape `[B, H, m, Dv]`), weights (`[B, m]`): The evicted values and their weights.
        log_decay (`torch.Tensor` of shape `[H]`), write_rate (`[H]`): `log(lam)` and `eta` per head.

    Returns:
        `LearnedState`: the sums after the pairs (new tensors).
    """
    m = features.shape[-2]
    pairs, old = decay_matrix(torch.tensor([m], device=features.device), weights, log_decay)
    p = pairs[:, :, 0] * write_rate.float().view(1, -1, 1)  # [B, H, m]
    a = old[:, :, 0]  # [1, H]
    pk = p.unsqueeze(-1) * features.float()  # [B, H, m, 2F]
    return LearnedState(
        a[..., None, None] * state.values + pk.transpose(-1, -2) @ values.float(),
        a[..., None] * state.mass + pk.sum(-2),
    )


def learned_read_features(
    state: LearnedState,
    query_features: torch.Tensor,
    features: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    prefix: torch.Tensor,
    log_decay: torch.Tensor,
    write_rate: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`learned_read`] with the features given: `(out, log_mass)` after the first `prefix[t]` pairs of the chunk.

    Args:
        state (`LearnedState`): The sums before the chunk.
        query_features (`torch.Tensor` of shape `[B, Hq, q, 2F]`): `phi(q)`; `Hq` a multiple of `H` (GQA).
        features (`[B, H, m, 2F]`), values (`[B, H, m, Dv]`), weights (`[B, m]`): The chunk's evicted pairs.
        prefix (`torch.LongTensor` of shape `[q]`): Pairs of the chunk written when each query reads.
        log_decay (`torch.Tensor` of shape `[H]`), write_rate (`[H]`): `log(lam)` and `eta` per head.

    Returns:
        `(out, log_mass)` as [`learned_read`].
    """
    batch, hq, q, _ = query_features.shape
    h = features.shape[1]
    fq = query_features.float().view(batch, h, hq // h, q, -1)  # [B, H, g, q, 2F]
    pairs, old = decay_matrix(prefix, weights, log_decay)  # [B, H, q, m], [1, H, q]
    pairs = pairs * write_rate.float().view(1, -1, 1, 1)
    scores = pairs[:, :, None] * (fq @ features.float().transpose(-1, -2)[:, :, None])  # [B, H, g, q, m]
    old = old[:, :, None, :, None]  # [1, H, 1, q, 1]
    num = old * (fq @ state.values[:, :, None]) + scores @ values.float()[:, :, None]  # [B, H, g, q, Dv]
    den = old[..., 0] * (fq @ state.mass[:, :, None, :, None])[..., 0] + scores.sum(-1)  # [B, H, g, q]
    empty = den <= 1e-30
    out = torch.where(empty[..., None], 0.0, num / den.clamp(min=1e-30)[..., None])
    log_mass = torch.where(empty, float("-inf"), torch.log(den.clamp(min=1e-30)))
    return out.reshape(batch, hq, q, -1), log_mass.reshape(batch, hq, q)


__all__ += ["learned_read_features", "learned_write_features"]  # here, after them: the file's top is shared
