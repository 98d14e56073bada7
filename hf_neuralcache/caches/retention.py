"""Retained tokens of `tensor_cache` (`cache_config["retain"]`): evicted tokens kept exactly, chosen by attention.

Per layer and KV head a pool of up to `size` key/value pairs, at their original positions (the keys keep the rotary
embedding they were computed with), beside the window and the memory:

    | sinks | ring: the last `window` tokens |  +  pool: `size` tokens that left the ring  +  memory: all the others

Every forward, after the queries have attended (window, memory and pool merged in one normaliser), the pool and the
pairs that left the ring in that forward compete for the pool's `size` places by their TOVA score (Oren et al. 2024,
"Transformers are Multi-State RNNs", adapted to chunks and KV groups): the attention weight each gets from this
forward's queries, the mean over the query heads of its KV group and over the queries that can see it, plus what is
left of the score it had after the previous forward (`carry` per forward, or with `carry_span`, `carry` per
`carry_span` queries: a decoded token then decays it by `carry ** (1 / carry_span)`, not by `carry`). The winners stay
in the pool; the losers are written into the memory, oldest first, exactly as the window's evictions are when there
is no pool.

The decision is made once per forward from that forward's queries, so the result depends on how the input was split
into forwards (as for TOVA, H2O and SnapKV): a prefill in 64-token chunks and one in a single forward keep slightly
different tokens. Rollback is exact with respect to that: after `crop`, the pool and the memory are those a run would
hold whose last forward had stopped at the kept length (the journal keeps each forward's per-query weights).
"""

from __future__ import annotations

import torch

from .retention_fit import retention_features

__all__ = ["RetainedTokens"]


class RetainedTokens:
    """The pool of one layer. Its tensors are set by [`init`]; every method keeps their shapes (torch.compile).

    Args:
        size (`int`): Entries per sequence and KV head (>= 1).
        carry (`float`, *optional*, defaults to 0.0): Share of an entry's previous score added to this forward's,
            in [0, 1). Its scores are then state between forwards (4 bytes an entry, counted in `nbytes`).
        prior (`torch.Tensor`, *optional*): `[Hkv, D/2 + 4]` weights of a fitted retention score
            ([`hf_neuralcache.caches.retention_fit.RetentionParams`]): candidates are ranked by
            `retention_features(score, ...) @ prior` instead of `score`. Parameters, not state.
        carry_span (`int`, *optional*): The number of queries `carry` is given for. A pool entry seen by `n` of a
            forward's queries keeps `c = carry ** (n / carry_span)` of its previous score and adds their mean weight
            times `(1 - c) / (1 - carry)`: a forward of `carry_span` queries adds its mean to `carry` times the
            previous score, and decoding one token at a time decays the score as smoothly. `None`: `carry` per
            forward, whatever its length (one decoded token then halves a score with `carry=0.5`).
    """

    def __init__(self, size: int, carry: float = 0.0, prior: torch.Tensor | None = None, carry_span: int | None = None):
        self.size, self.carry = int(size), float(carry)
        self.carry_span = None if carry_span is None else int(carry_span)
        self.prior = None if prior is None else prior.float()
        self.keys = self.values = self.positions = self.scores = None

    def init(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.size, dim)
        self.values = value_states.new_zeros(batch, heads, self.size, value_states.shape[-1])
        self.positions = torch.full((batch, heads, self.size), -1, dtype=torch.long, device=key_states.device)
        self.scores = torch.zeros(batch, heads, self.size, dtype=torch.float32, device=key_states.device)
        if self.prior is not None:  # once, not in every step's choice
            self.prior = self.prior.to(key_states.device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.keys, self.values, self.positions, self.scores]

    def set_tensors(self, tensors) -> None:
        self.keys, self.values, self.positions, self.scores = tensors

    def nbytes(self) -> int:
        held = [self.keys, self.values, self.positions] + ([self.scores] if self.carry else [])
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # ---- attention ------------------------------------------------------------------------------------------------
    def logits(self, query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
        """fp32 logits `[B, Hkv, G, q, n]` of each KV group's queries (`[B, Hq, q, D]`) over `keys` `[B, Hkv, n, D]`."""
        batch, hq, q, dim = query.shape
        hkv = keys.shape[1]
        grouped = query.float().reshape(batch, hkv, hq // hkv, q, dim)
        logits = grouped @ keys.float().unsqueeze(2).transpose(-1, -2) * scaling
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return logits

    def attend(self, query, scaling, softcap, keys, values, positions, valid, q_positions, window):
        """Softmax attention over the candidates: the pool (every entry precedes every query) and the pairs leaving
        the ring in this forward, each seen by the queries it is outside the window of (`position <= t - window`;
        the window holds the others). Returns `(out [B, Hq, q, Dv], lse [B, Hq, q], logits [B, Hkv, G, q, size + m],
        visible [B, q, size + m])`; a query that sees no candidate gets `out` 0 and `lse` `-inf`.

        Args:
            keys (`[B, Hkv, m, D]`), values (`[B, Hkv, m, Dv]`), positions (`[m]`), valid (`[B, m]`): The pairs leaving
                the ring (`valid`: a real token that is not a sink).
            q_positions (`[q]`): The queries' positions.
        """
        batch, hq, q, _ = query.shape
        logits = self.logits(query, torch.cat([self.keys, keys], 2), scaling, softcap)
        sees = q_positions.view(-1, 1) - window >= positions.view(1, -1)  # [q, m]
        visible = torch.cat([(self.positions[:, 0] >= 0).unsqueeze(1).expand(-1, q, -1),
                             sees.unsqueeze(0) & valid.bool().unsqueeze(1)], -1)  # fmt: skip
        logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
        lse = logits.logsumexp(-1)  # [B, Hkv, G, q]
        probs = torch.nan_to_num(torch.exp(logits - lse.unsqueeze(-1)), nan=0.0)
        out = probs @ torch.cat([self.values, values], 2).float().unsqueeze(2)  # [B, Hkv, G, q, Dv]
        return out.reshape(batch, hq, q, -1), lse.reshape(batch, hq, q), logits, visible

    def weights(self, logits, visible, lse, q_real):
        """Per-query attention weights of the candidates in the merged softmax (window, memory and candidates), the
        mean over each KV group's query heads: `[B, Hkv, q, size + m]`, 0 where a query does not see a candidate or
        is padding; and `visible` `[B, q, size + m]` with padding queries removed.

        Args:
            logits, visible: From [`attend`].
            lse (`[B, Hq, q]`): The log-denominator of the merged softmax.
            q_real (`[B, q]` bool): Which queries are real tokens.
        """
        batch, hkv = logits.shape[:2]
        lse = lse.reshape(batch, hkv, -1, lse.shape[-1], 1)
        weights = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)).mean(2)  # [B, Hkv, q, R + m]
        visible = visible & q_real.unsqueeze(-1)
        return torch.where(visible.unsqueeze(1), weights, 0.0), visible

    def select(self, weights, visible, keys, values, positions, valid, start=0):
        """Keep the `size` best-scored candidates; return the losers to write into the memory and an undo record.

        Args:
            weights, visible: From [`weights`] (`[B, Hkv, q, R + m]`, `[B, q, R + m]`).
            keys (`[B, Hkv, m, D]`), values (`[B, Hkv, m, Dv]`), positions (`[m]`): The pairs leaving the ring.
            valid (`[B, m]`): Which of them are real tokens that are not sinks (the others are never kept).
            start (`int` or 0-d tensor): The forward's first query position (the candidates' age, for `prior`).

        Returns:
            `(keys, values, weights, record)`: `m` columns per head for the memory, `[B, m]` weights (0 for the
            columns that carry nothing, which come first; then the losers, oldest first), and what [`undo`] needs.
        """
        size, m = self.size, keys.shape[2]
        batch, heads = keys.shape[:2]
        seen = visible.sum(1).unsqueeze(1)  # [B, 1, R + m]: how many of this forward's queries see each candidate
        score = weights.sum(2) / seen.clamp(min=1)  # [B, Hkv, R + m]: the mean over them
        if self.carry_span is None:
            score[..., :size] += self.carry * self.scores
        elif self.carry:  # per query: n queries decay the carried score as n / carry_span forwards of carry_span
            kept = self.carry ** (seen[..., :size].float() / self.carry_span)
            score[..., :size] = score[..., :size] * (1.0 - kept) / (1.0 - self.carry) + kept * self.scores
        cand_pos = torch.cat([self.positions, positions.view(1, 1, m).expand(batch, heads, m)], -1)
        cand_valid = torch.cat([self.positions >= 0, valid.bool().unsqueeze(1).expand(batch, heads, m)], -1)
        cand_k, cand_v = torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)
        rank = score
        if self.prior is not None:  # the fitted estimate of the log of the largest weight later queries will give
            features = retention_features(score, cand_k, cand_v, cand_pos, start)  # [B, H, R + m, P]
            rank = (features * self.prior.unsqueeze(1)).sum(-1)
        ranked = rank.masked_fill(~cand_valid, float("-inf"))
        keep = torch.zeros_like(cand_valid).scatter_(-1, ranked.topk(size, dim=-1).indices, True) & cand_valid
        # the kept leaving pairs move into the pool's free places (emptied or never filled), both in index order
        free, incoming = ~keep[..., :size], keep[..., size:]
        pairs = min(size, m)
        slots = torch.argsort((~free).to(torch.int8), dim=-1, stable=True)[..., :pairs]  # [B, H, P]
        sources = torch.argsort((~incoming).to(torch.int8), dim=-1, stable=True)[..., :pairs]
        use = torch.arange(pairs, device=keys.device) < incoming.sum(-1, keepdim=True)  # [B, H, P]
        record = (slots, *(_gather(t, slots) for t in (self.keys, self.values, self.positions)), self.scores.clone())
        # the losers, oldest first: a dropped pool entry or leaving pair sorts by position, everything else before
        dropped = cand_valid & ~keep
        order = torch.where(dropped, cand_pos, -1).argsort(dim=-1, stable=True)[..., -m:]  # [B, H, m]
        out_k, out_v = _gather(cand_k, order), _gather(cand_v, order)
        n_dropped = dropped.sum(-1)[:, 0]  # [B]: the same count leaves every head
        out_w = (torch.arange(m, device=keys.device) >= m - n_dropped.unsqueeze(-1)).float()  # [B, m]
        new_scores = torch.where(keep, score, 0.0)
        self._place(slots, sources, use, keys, values, positions.view(1, 1, m).expand(batch, heads, m), new_scores)
        return out_k, out_v, out_w, record

    def _place(self, slots, sources, use, keys, values, positions, scores) -> None:
        """Move the leaving pairs `sources` into the pool's `slots` where `use`; scores: the kept candidates'. In
        place: the pool keeps its addresses (CUDA graphs replay the decode step on the same tensors)."""
        size = self.size
        incoming = torch.where(use, _gather(scores[..., size:], sources), _gather(scores[..., :size], slots))
        self.scores.copy_(scores[..., :size].scatter(-1, slots, incoming))
        for pool, new in ((self.keys, keys), (self.values, values)):
            moved = torch.where(use.unsqueeze(-1), _gather(new, sources), _gather(pool, slots))
            pool.copy_(_scatter(pool, slots, moved))
        held = torch.where(use, _gather(positions, sources), _gather(self.positions, slots))
        self.positions.copy_(self.positions.scatter(-1, slots, held))

    def undo(self, record) -> None:
        """Put back what one [`select`] changed."""
        slots, keys, values, positions, scores = record
        self.keys.copy_(_scatter(self.keys, slots, keys))
        self.values.copy_(_scatter(self.values, slots, values))
        self.positions.copy_(self.positions.scatter(-1, slots, positions))
        self.scores.copy_(scores)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, index[b, h, i]]` for `[B, H, n]` or `[B, H, n, D]` tensors."""
    if tensor.dim() == 3:
        return tensor.gather(2, index)
    return tensor.gather(2, index.unsqueeze(-1).expand(*index.shape, tensor.shape[-1]))


def _scatter(tensor: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return tensor.scatter(2, index.unsqueeze(-1).expand(*index.shape, tensor.shape[-1]), source.to(tensor.dtype))

