"""The bookkeeping of a [`PagedKVCache`]: page tables, reference counts, the free list and the write plan.

Every layer of a paged cache holds its own pool of pages, but all layers hold the same tokens at the same page
ids, so one `PageTable` per cache does the bookkeeping once per forward, not once per layer. It lives on the CPU:
beam reordering and copy-on-write decisions never wait for the GPU.

    table [B, n]      page id of each sequence's pages, in order (every row has ceil(length / page_size) pages)
    refs  [capacity]  how many table entries point at each page (pages shared by beams count once per beam)
    free  list        pages with no reference, reused before the pool grows
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["PageBudgetExceededError", "PageTable", "WritePlan"]


class PageBudgetExceededError(RuntimeError):
    """The pages a forward needs exceed the `max_pages` budget of a paged cache. The cache is left unchanged."""


@dataclass
class WritePlan:
    """Where one forward writes its new tokens: computed once (by the first layer) and applied by every layer."""

    start: int  # tokens held before this forward
    q_length: int
    rows: torch.Tensor | None  # [R] rows whose tokens are written (one per group of sharing rows); None = all rows
    slots: torch.Tensor  # [R * q] flat slot (page * page_size + offset) of each written token, row-major
    copies: tuple[torch.Tensor, torch.Tensor] | None  # (source pages, destination pages) copied before writing
    table: torch.Tensor  # [B, n] page table after this forward
    kv_start: torch.Tensor | None  # [B] leading padding tokens; None when the padding is not only leading
    _on: dict = field(default_factory=dict)

    def on(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The plan's tensors on `device`, moved once per forward and device (layers of a split model differ)."""
        moved = self._on.get(device)
        if moved is None:
            batch = self.table.shape[0]

            def to(t):
                return None if t is None else t.to(device, non_blocking=True)

            moved = self._on[device] = {
                "rows": to(self.rows),
                "slots": to(self.slots),
                "src": to(self.copies[0]) if self.copies else None,
                "dst": to(self.copies[1]) if self.copies else None,
                "table": to(self.table.to(torch.int32)),
                "seq_lens": torch.full((batch,), self.start + self.q_length, dtype=torch.int32, device=device),
                "kv_start": to(None if self.kv_start is None else self.kv_start.to(torch.int32)),
            }
        return moved


class PageTable:
    """Page tables, reference counts and the free list shared by the layers of one paged cache.

    Args:
        page_size (`int`): Tokens per page.
        max_pages (`int`, *optional*): Most pages per layer; `None` lets the pool grow as needed.
    """

    def __init__(self, page_size: int, max_pages: int | None = None):
        self.page_size = page_size
        self.max_pages = max_pages
        self.page_bytes = 0  # bytes of one page in all layers together (K and V), known once the layers exist
        self.in_place = False  # this forward reads pages in place (the "neuralcache" attention), set by the mask hook
        self.reset()

    def reset(self) -> None:
        self.capacity = 0
        self.refs = torch.zeros(0, dtype=torch.long)
        self.free: list[int] = []
        self.table = torch.zeros(0, 0, dtype=torch.long)
        self.length = 0
        self.plan: WritePlan | None = None

    @property
    def pages_in_use(self) -> int:
        """Pages referenced by at least one sequence (per layer)."""
        return self.capacity - len(self.free)

    # ---- allocation -----------------------------------------------------------------------------------------------
    def _reserve(self, needed: int) -> None:
        """Make sure `needed` pages are free, growing the pool by at least an eighth; raise past `max_pages`."""
        short = needed - len(self.free)
        if short <= 0:
            return
        if self.max_pages is not None and self.capacity + short > self.max_pages:
            cost = f" (one page costs {self.page_bytes} bytes over all layers)" if self.page_bytes else ""
            raise PageBudgetExceededError(
                f"paged_kv needs {needed} more pages of {self.page_size} tokens per layer for this step, but "
                f"{self.pages_in_use} of max_pages={self.max_pages} are in use and only "
                f"{len(self.free) + self.max_pages - self.capacity} are left: expected a budget of at least "
                f"{self.pages_in_use + needed} pages. Raise "
                f"cache_config['max_pages']{cost}, or generate fewer or shorter sequences (each sequence needs "
                f"ceil(tokens / page_size) pages, minus those it shares). The cache is unchanged."
            )
        grown = self.capacity + max(short, self.capacity // 8)
        if self.max_pages is not None:
            grown = min(grown, self.max_pages)
        self.refs = torch.cat([self.refs, torch.zeros(grown - self.capacity, dtype=torch.long)])
        self.free.extend(range(grown - 1, self.capacity - 1, -1))  # popped lowest first
        self.capacity = grown

    def _retable(self, table: torch.Tensor) -> None:
        """Replace the page table, moving reference counts and freeing pages nobody holds any more."""
        old = torch.bincount(self.table.flatten(), minlength=self.capacity)
        self.refs += torch.bincount(table.flatten(), minlength=self.capacity) - old
        self.free.extend(((old > 0) & (self.refs == 0)).nonzero().flatten().tolist())
        self.table = table
        self.plan = None

    # ---- batch operations and rollback: table updates only ---------------------------------------------------------
    def select(self, indices) -> None:
        """Rows `indices` of the current table become the new batch (beam reorder, select, repeat)."""
        if self.table.numel() == 0 and self.length == 0:
            return
        index = torch.as_tensor(indices).cpu()
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.long()
        if index.numel() and (index.min() < -len(self.table) or index.max() >= len(self.table)):
            raise ValueError(f"expected batch indices in [0, {len(self.table)}), got {indices!r}.")
        self._retable(self.table[index].clone())

    def crop(self, target: int) -> None:
        """Keep the first `target` tokens: pages past them are released, a partly kept page stays."""
        self._retable(self.table[:, : math.ceil(target / self.page_size)].clone())
        self.length = target

    # ---- the write plan of one forward ----------------------------------------------------------------------------
    def plan_for(self, start: int, key: torch.Tensor, value: torch.Tensor, padding: torch.Tensor | None) -> WritePlan:
        """The plan of the forward that writes `key`/`value` (`[B, H, q, D]`) after `start` tokens.

        The first layer to call this in a forward makes the plan (pages allocated, copies decided, table updated);
        the other layers get the same plan back.
        """
        q = key.shape[-2]
        plan = self.plan
        if plan is not None and plan.start == start and plan.q_length == q:
            return plan
        if start != self.length:
            raise RuntimeError(f"paged_kv: a layer holds {start} tokens but the page table {self.length}.")
        batch = key.shape[0]
        if self.length == 0 and self.table.shape[0] != batch:
            self._retable(torch.zeros(batch, 0, dtype=torch.long))
        if self.table.shape[0] != batch:
            raise ValueError(
                f"expected a batch of {self.table.shape[0]} sequences (what the cache holds), got {batch}; change "
                "the batch with `reorder_cache`, `batch_select_indices` or `batch_repeat_interleave`."
            )
        self.plan = plan = self._make_plan(start, key, value, padding)
        self.table, self.length = plan.table, start + q
        return plan

    def _groups(self, key: torch.Tensor, value: torch.Tensor, padding: torch.Tensor | None, end: int) -> list[int]:
        """`leader[b]`: the first of the consecutive rows that hold the same pages and write the same tokens as `b`.

        Beam search and `num_return_sequences` repeat each prompt (`repeat_interleave`), so the copies of a prompt
        share its pages from the first forward on instead of holding one copy each.
        """
        batch = key.shape[0]
        leader = list(range(batch))
        if batch == 1:
            return leader
        same_table = (self.table[1:] == self.table[:-1]).all(1).tolist()
        for b in range(1, batch):
            a = leader[b - 1]
            if (
                same_table[b - 1]
                and torch.equal(key[b], key[a])
                and torch.equal(value[b], value[a])
                and (padding is None or torch.equal(padding[b, :end], padding[a, :end]))
            ):
                leader[b] = a
        return leader

    def _make_plan(self, start: int, key: torch.Tensor, value: torch.Tensor, padding: torch.Tensor | None) -> WritePlan:
        page_size, q = self.page_size, key.shape[-2]
        end = start + q
        n_old, n_new = self.table.shape[1], math.ceil(end / page_size)
        leader = self._groups(key, value, padding, end)
        writers = [b for b, a in enumerate(leader) if a == b]
        size = {w: leader.count(w) for w in writers}
        # copy-on-write: a writer whose partly filled last page is also held outside its group copies it first;
        # the last group still holding the page writes into it in place
        cow, left = {}, {}
        if start % page_size:
            for w in writers:
                page = int(self.table[w, n_old - 1])
                held = left.get(page, int(self.refs[page]))
                if held > size[w]:
                    cow[w] = page
                    held -= size[w]
                left[page] = held
        self._reserve(len(cow) + len(writers) * (n_new - n_old))  # raises before anything changes
        table = torch.empty(len(leader), n_new, dtype=torch.long)
        table[:, :n_old] = self.table
        src, dst = [], []
        for w in writers:
            if w in cow:
                src.append(cow[w])
                dst.append(self.free.pop())
                table[w, n_old - 1] = dst[-1]
            table[w, n_old:] = torch.tensor([self.free.pop() for _ in range(n_new - n_old)], dtype=torch.long)
        for b, a in enumerate(leader):
            if a != b:
                table[b] = table[a]
        self._retable(table)
        positions = torch.arange(start, end)
        rows = torch.tensor(writers, dtype=torch.long)
        slots = (table[rows][:, positions // page_size] * page_size + positions % page_size).flatten()
        copies = (torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)) if src else None
        return WritePlan(
            start,
            q,
            None if len(writers) == len(leader) else rows,
            slots,
            copies,
            table,
            _leading(padding, len(leader), end),
        )


def _leading(padding: torch.Tensor | None, batch: int, end: int) -> torch.Tensor | None:
    """`[B]` leading padding tokens per row, or `None` when some row has padding after a real token."""
    if padding is None:
        return torch.zeros(batch, dtype=torch.long)
    pad = padding[:, :end].cpu()
    start = (~pad).long().cumprod(-1).sum(-1)  # leading False entries
    if not torch.equal(pad, torch.arange(end).unsqueeze(0) >= start.unsqueeze(1)):
        return None
    return start
