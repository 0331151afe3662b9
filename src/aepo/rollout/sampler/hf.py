"""The HF-forward path: any causal LM with a standard full-attention cache, driven through
its own forward with a `DynamicCache` and an explicit 4-D mask."""
from __future__ import annotations

import torch

from aepo.rollout.sampler.layout import Chunk, Layout, prefill_mask, take_spans


class HFBatch:
    """Any causal LM with a standard cache: the model's own forward, DynamicCache, 4-D mask."""

    def __init__(
        self, model: torch.nn.Module, layout: Layout, keys: list[torch.Tensor] | None,
        values: list[torch.Tensor] | None,
    ):
        """`keys`, `values`: per layer [B, kv_heads, cached columns, head_dim], or None."""
        from transformers import DynamicCache

        self.model = model
        self.layout = layout
        self.dtype = next(model.parameters()).dtype
        if keys is None or values is None:
            self.cache = DynamicCache()
        else:
            self.cache = DynamicCache(ddp_cache_data=list(zip(keys, values)))

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def prefill(self) -> torch.Tensor:
        lay = self.layout
        mask = self._additive(prefill_mask(lay, slice(None)))
        out = self.model(
            input_ids=lay.pending_tokens,
            attention_mask=mask,
            position_ids=lay.pending_positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, col: int) -> torch.Tensor:
        if self.cache.get_seq_length() != col:
            raise RuntimeError(f"cache holds {self.cache.get_seq_length()} columns, expected {col}")
        mask = self._additive(self.layout.key_valid[:, None, None, : col + 1])
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def take(self, spans: list[tuple[int, int, int]], free: bool = False) -> list[Chunk]:
        """`LeanBatch.take` for the DynamicCache's layers (`free`: the cache is dropped and its
        layers freed one at a time as they are copied out)."""
        keys = [layer.keys for layer in self.cache.layers]
        values = [layer.values for layer in self.cache.layers]
        if free:
            self.cache = None  # the lists hold the layers now
        return take_spans(keys, values, spans, free=free)

    def keep(self, slots: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, slots)
            layer.values = layer.values.index_select(0, slots)


# --------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------
