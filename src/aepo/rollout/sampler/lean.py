"""The lean forward for the Llama family (Llama, Qwen2, Qwen3) and its packed variant.

The lean path calls the HF model's own submodules on a preallocated batch cache written in
place, skipping the per-step overhead of the HF forward (mask building, cache objects, output
classes); cos/sin come from a table built once per call. The packed variant, for small float32
models with plain `nn.Linear` layers (the built-in demo models), also stacks the q/k/v and
gate/up weights (copies rebuilt when a parameter's version changes, i.e. after an optimizer
step) and fuses the residual adds, so a CPU decode step runs about half as many kernels.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aepo.rollout.sampler.capture import capture_graph, capture_or_warn
from aepo.rollout.sampler.layout import (
    PREFILL_PASS_OVERHEAD_TOKENS,
    PREFILL_SCORE_BUDGET,
    PREFILL_TOKEN_BUDGET,
    Chunk,
    Layout,
    padded_ranges,
    prefill_mask,
    take_spans,
)

LEAN_MODEL_TYPES = ("llama", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only


def supports_lean_forward(model: torch.nn.Module) -> bool:
    """True when the compact Llama-family forward reproduces this model's HF forward."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return False
    inner = getattr(model, "model", None)
    if inner is None or not all(
        hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")
    ):
        return False
    if not hasattr(model, "lm_head"):
        return False
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(
            hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
        ):
            return False
        if not all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
    return True


def _write(
    keys: torch.Tensor,
    values: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    col0: int,
    write_col: torch.Tensor | None,
) -> None:
    """Store one layer's new keys and values [b, kv_heads, Q, hd] at columns col0.. of its cache
    [b, kv_heads, S, hd], or at the columns held by the tensor `write_col`: [1] (one column for
    every row) or [b, Q] (each row's own columns, the continuous batch's ragged rows)."""
    if write_col is None:
        keys[:, :, col0 : col0 + k.shape[2]] = k
        values[:, :, col0 : col0 + v.shape[2]] = v
    elif write_col.dim() == 1:
        keys.index_copy_(2, write_col, k)
        values.index_copy_(2, write_col, v)
    else:
        index = write_col[:, None, :, None].expand(k.shape)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _PackedLayer:
    """One decoder layer's weights, concatenated so a step runs fewer, larger kernels."""

    norm1: torch.Tensor
    norm1_eps: float
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * hd, H]: q, k, v projections stacked
    qkv_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [Hq + Hkv, hd]: q_norm weight per q head, k_norm per kv head
    qk_norm_eps: float
    out: torch.Tensor  # o_proj [H, Hq * hd]
    out_bias: torch.Tensor | None
    norm2: torch.Tensor
    norm2_eps: float
    gate_up: torch.Tensor  # [2 I, H]: gate and up projections stacked
    down: torch.Tensor  # [H, I]


@dataclass
class PackedModel:
    layers: list[_PackedLayer]
    norm: torch.Tensor
    norm_eps: float
    lm_head: torch.Tensor
    versions: tuple[int, ...]  # parameter versions the copies were made from


_PACKED_MAX_BYTES = 64 << 20  # pack only small models: the copies double their linear weights


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def adapter_flags(model: torch.nn.Module) -> tuple[int, ...]:
    """Whether each LoRA layer's adapters are disabled (peft's `disable_adapter()` flips a flag,
    not a parameter, so nothing else tells a computation made under it from one made outside)."""
    return tuple(int(bool(m.disable_adapters)) for m in model.modules() if _lora_layer(m) is not None)


def parameter_versions(model: torch.nn.Module) -> tuple[int, ...]:
    """Every parameter's version counter and the adapter flags (`adapter_flags`): packed copies
    made under other values are stale."""
    return tuple(p._version for p in model.parameters()) + adapter_flags(model)


def _lora_layer(module: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain base layer of an unmerged peft LoRA linear layer, else None."""
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(module, "lora_A") or not hasattr(module, "scaling"):
        return None
    dora = getattr(module, "use_dora", None) or {}
    if getattr(module, "merged_adapters", None) or any(dora.get(n, False) for n in module.active_adapters):
        return None
    return base


def _linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The weight a linear layer applies: a plain `nn.Linear`'s, or for a LoRA layer its base
    weight plus scaling * B A of each active adapter (its forward in eval mode, merged into one
    matrix; the base weight itself is never changed). None for anything else."""
    if type(module) is torch.nn.Linear:
        return module.weight
    base = _lora_layer(module)
    if base is None:
        return None
    weight = base.weight
    if module.disable_adapters:
        return weight
    for name in module.active_adapters:
        if name in module.lora_A:
            weight = weight + module.scaling[name] * (module.lora_B[name].weight @ module.lora_A[name].weight)
    return weight


def _linear_bias(module: torch.nn.Module) -> torch.Tensor | None:
    return module.bias if type(module) is torch.nn.Linear else module.base_layer.bias


def pack_llama_weights(model: torch.nn.Module) -> PackedModel | None:
    """Stacked copies of a small float32 Llama-family model's weights, or None when the model
    does not qualify (plain `nn.Linear` layers without MLP bias, RMSNorm, SiLU, small size).
    A peft LoRA layer counts as the linear layer it computes, its adapters merged into the copy
    (`_linear_weight`); other wrapped layers keep the module path."""
    if not supports_lean_forward(model) or getattr(model.config, "hidden_act", None) != "silu":
        return None
    inner = model.model
    params = list(model.parameters())
    if (
        params[0].dtype != torch.float32
        or sum(p.numel() * p.element_size() for p in params) > _PACKED_MAX_BYTES
    ):
        return None
    head = model.lm_head
    if type(head) is not torch.nn.Linear or head.bias is not None or not _is_rms_norm(inner.norm):
        return None
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        linears += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        weights = [_linear_weight(m) if m is not None else None for m in linears]
        if any(w is None for w in weights):
            return None
        q_w, k_w, v_w, o_w, gate_w, up_w, down_w = weights
        if any(_linear_bias(m) is not None for m in linears[4:]):
            return None
        if not (_is_rms_norm(layer.input_layernorm) and _is_rms_norm(layer.post_attention_layernorm)):
            return None
        qkv_biases = [_linear_bias(attn.q_proj), _linear_bias(attn.k_proj), _linear_bias(attn.v_proj)]
        if any(b is None for b in qkv_biases) and any(b is not None for b in qkv_biases):
            return None
        qk_norm = None
        qk_eps = 0.0
        if hasattr(attn, "q_norm"):
            if not (_is_rms_norm(attn.q_norm) and _is_rms_norm(attn.k_norm)):
                return None
            n_q = q_w.shape[0] // attn.head_dim
            n_kv = k_w.shape[0] // attn.head_dim
            qk_norm = torch.cat([attn.q_norm.weight.expand(n_q, -1), attn.k_norm.weight.expand(n_kv, -1)])
            qk_eps = attn.q_norm.variance_epsilon
            if attn.k_norm.variance_epsilon != qk_eps:
                return None
        layers.append(
            _PackedLayer(
                norm1=layer.input_layernorm.weight.detach(),
                norm1_eps=layer.input_layernorm.variance_epsilon,
                qkv=torch.cat([q_w, k_w, v_w]).detach(),
                qkv_bias=None if qkv_biases[0] is None else torch.cat(qkv_biases).detach(),
                qk_norm=None if qk_norm is None else qk_norm.detach(),
                qk_norm_eps=qk_eps,
                out=o_w.detach(),
                out_bias=None if _linear_bias(attn.o_proj) is None else _linear_bias(attn.o_proj).detach(),
                norm2=layer.post_attention_layernorm.weight.detach(),
                norm2_eps=layer.post_attention_layernorm.variance_epsilon,
                gate_up=torch.cat([gate_w, up_w]).detach(),
                down=down_w.detach(),
            )
        )
    return PackedModel(
        layers=layers,
        norm=inner.norm.weight.detach(),
        norm_eps=inner.norm.variance_epsilon,
        lm_head=head.weight.detach(),
        versions=parameter_versions(model),
    )


class _LayerOps:
    """One decoder layer's projections for `LeanBatch._forward`, on hidden states [b*Q, H]."""

    def qkv(self, x: torch.Tensor, b: int, q_len: int, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, Q, Hq, hd], k and v [b, Q, Hkv, hd]: projected, q/k-normed, q and k rotated."""
        raise NotImplementedError

    def attn_out(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x + o_proj(attention output [b*Q, Hq*hd])."""
        raise NotImplementedError

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(post-attention norm(x))."""
        raise NotImplementedError


class _ModuleOps(_LayerOps):
    """The HF layer's own submodules (any dtype, LoRA-wrapped projections included)."""

    def __init__(self, layer: torch.nn.Module, batch: LeanBatch) -> None:
        # a weak reference: the batch owns its ops, and a cycle would keep the batch's cache
        # alive after the call until a gc pass
        self.layer, self.attn, self.batch = layer, layer.self_attn, weakref.proxy(batch)

    def qkv(self, x, b, q_len, cos, sin):  # type: ignore[no-untyped-def]
        bt, attn = self.batch, self.attn
        h = bt._norm(self.layer.input_layernorm, x)
        q = attn.q_proj(h).view(b, q_len, bt.n_heads, bt.head_dim)
        k = attn.k_proj(h).view(b, q_len, bt.n_kv, bt.head_dim)
        v = attn.v_proj(h).view(b, q_len, bt.n_kv, bt.head_dim)
        if bt.qk_norm:
            q = bt._norm(attn.q_norm, q)
            k = bt._norm(attn.k_norm, k)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def attn_out(self, x, out):  # type: ignore[no-untyped-def]
        return x + self.attn.o_proj(out)

    def mlp(self, x):  # type: ignore[no-untyped-def]
        return x + self.layer.mlp(self.batch._norm(self.layer.post_attention_layernorm, x))


class _PackedOps(_LayerOps):
    """The packed weights (`_PackedLayer`): one matmul for q/k/v, one for gate/up, the residual
    adds fused into the output matmuls, one norm and one rotation for q and k together."""

    def __init__(self, layer: _PackedLayer, batch: LeanBatch) -> None:
        self.p, self.batch = layer, weakref.proxy(batch)  # the batch owns its ops (no cycle)

    def qkv(self, x, b, q_len, cos, sin):  # type: ignore[no-untyped-def]
        p, bt = self.p, self.batch
        n_q, n_kv = bt.n_heads, bt.n_kv
        h = F.rms_norm(x, (x.shape[-1],), p.norm1, p.norm1_eps)
        qkv = F.linear(h, p.qkv, p.qkv_bias).view(b, q_len, n_q + 2 * n_kv, bt.head_dim)
        qk, v = qkv[:, :, : n_q + n_kv], qkv[:, :, n_q + n_kv :]
        if p.qk_norm is not None:
            qk = F.rms_norm(qk, (bt.head_dim,), None, p.qk_norm_eps) * p.qk_norm
        qk = qk * cos + _rotate_half(qk) * sin
        return qk[:, :, :n_q], qk[:, :, n_q:], v

    def attn_out(self, x, out):  # type: ignore[no-untyped-def]
        x = torch.addmm(x, out, self.p.out.t())
        return x if self.p.out_bias is None else x + self.p.out_bias

    def mlp(self, x):  # type: ignore[no-untyped-def]
        p = self.p
        gate, up = F.linear(F.rms_norm(x, (x.shape[-1],), p.norm2, p.norm2_eps), p.gate_up).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate) * up, p.down.t())


class LeanBatch:
    """Llama-family forward on a preallocated cache: per layer, keys and values [B, kv_heads, S,
    head_dim] (one tensor a layer, so growing or compacting it, or copying rows out at the end,
    holds one extra layer at a time, not a second cache)."""

    def __init__(
        self,
        model: torch.nn.Module,
        layout: Layout | None,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        packed: PackedModel | None = None,
        positions: int | None = None,
    ):
        """`positions`: the rope table's length when there is no layout (`layout` None: the
        continuous batch's forward, `aepo.rollout.sampler.continuous`, which holds its cache
        itself and passes one empty tensor of the cache's dtype and device)."""
        inner = model.model
        self.packed = packed
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.n_kv = int(model.config.num_key_value_heads)
        self.n_heads = int(model.config.num_attention_heads)
        self.groups = self.n_heads // self.n_kv
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        # Single-query attention by two matmuls beats SDPA's CPU kernel about 2x at these
        # sizes; on CUDA (and for prefill) SDPA is used.
        like = keys[0]
        self.manual_decode = like.device.type == "cpu"
        # torch's fused RMSNorm equals the HF module in float32 (HF casts around it otherwise).
        norms = [self.norm] + [
            m
            for layer in self.layers
            for m in (
                layer.input_layernorm,
                layer.post_attention_layernorm,
                *((layer.self_attn.q_norm, layer.self_attn.k_norm) if self.qk_norm else ()),
            )
        ]
        self.fused_norm = like.dtype == torch.float32 and all(
            type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") for m in norms
        )
        self.scaling = float(attn.scaling)
        if packed is not None:
            self.ops: list[_LayerOps] = [_PackedOps(layer, self) for layer in packed.layers]
        else:
            self.ops = [_ModuleOps(layer, self) for layer in self.layers]
        self.layout = layout
        self.keys = keys
        self.values = values
        if layout is not None:
            decode_columns = layout.total_len - layout.cache_len - layout.pending_len
            positions = int(layout.next_positions.max()) + decode_columns + 1
        self.rope_table = self._rope_table(int(positions or 0), like)
        self.graphs: DecodeGraphs | None = None
        self.cache_version = 0  # bumped when `keys`/`values` are replaced (grow, keep)

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """Logits [b, V] of the last hidden states [b, hidden]."""
        if self.packed is not None:
            p = self.packed
            return F.linear(F.rms_norm(last, (last.shape[-1],), p.norm, p.norm_eps), p.lm_head)
        return self.lm_head(self._norm(self.norm, last))

    def use_decode_graphs(self, capture: bool = True) -> None:
        """Replay decode steps as CUDA graphs (`DecodeGraphs`); `capture=False` runs the same
        static-shape steps eagerly (any device; what the CPU tests check)."""
        self.graphs = DecodeGraphs(self, capture)

    def _rope_table(self, length: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos/sin for positions 0..length-1, when they do not depend on the sequence's length."""
        if getattr(self.rotary, "rope_type", None) not in STATIC_ROPE_TYPES:
            return None
        positions = torch.arange(length, device=keys.device)[None]
        cos, sin = self.rotary(torch.empty(0, dtype=keys.dtype, device=keys.device), positions)
        return cos[0], sin[0]

    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fused_norm:
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module(x)

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        col0: int,
        kv_len: int,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        k0: int = 0,
        write_col: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run tokens [b, Q] at columns col0.. of the (row-sliced) cache, attending to columns
        k0..kv_len (`mask` [b, 1, Q, kv_len - k0]; earlier ones are padding for every row);
        logits of the last column. `write_col` gives the columns to write as a tensor instead
        of `col0`: [1] (Q = 1, so the step's shapes do not depend on it: CUDA graphs) or [b, Q]
        (each row's own columns). Each layer's projections come from its `_LayerOps` (the HF
        modules, or the packed weights); the attention and the cache are the same for both."""
        b, q_len = tokens.shape
        x = self.embed(tokens)
        cos, sin = self.rope(x, positions)
        x = x.reshape(b * q_len, -1)
        decode = q_len == 1 and self.manual_decode
        if decode:  # single-query attention by two matmuls: about 2x SDPA's CPU kernel here
            additive = self.decode_bias(mask)
        else:
            grouped_mask = self.grouped_mask(mask)
        for index, ops in enumerate(self.ops):
            q, k, v = ops.qkv(x, b, q_len, cos, sin)  # [b, Q, heads, hd], normed and rotated
            _write(keys[index], values[index], k.transpose(1, 2), v.transpose(1, 2), col0, write_col)
            layer_keys, layer_values = keys[index][:, :, k0:kv_len], values[index][:, :, k0:kv_len]
            if decode:
                out = self.decode_attention(q, layer_keys, layer_values, additive)
            else:
                out = self.grouped_attention(q, layer_keys, layer_values, grouped_mask)
            x = ops.mlp(ops.attn_out(x, out))
        return self.head(x.view(b, q_len, -1)[:, -1])

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [b, Q, 1, hd] of `positions` [b, Q] (broadcast over the heads)."""
        if self.rope_table is not None:
            cos, sin = self.rope_table[0][positions], self.rope_table[1][positions]
        else:
            cos, sin = self.rotary(x, positions)
        return cos[:, :, None], sin[:, :, None]

    def decode_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """The additive mask [b * kv_heads, G, width] of single-query attention from a key mask
        [b, 1, 1, width] (True: attend)."""
        b, width = mask.shape[0], mask.shape[-1]
        additive = torch.zeros(mask.shape, dtype=self.keys[0].dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        return additive.expand(b, self.n_kv, self.groups, width).reshape(b * self.n_kv, self.groups, width)

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         additive: torch.Tensor) -> torch.Tensor:
        """One query per row (q: b x heads x hd elements) over keys and values [b, kv_heads,
        width, hd], by two matmuls (about 2x SDPA's CPU kernel at these sizes) -> [b, heads * hd]."""
        b, n_kv, width, hd = keys.shape
        scores = torch.baddbmm(additive, q.reshape(b * n_kv, self.groups, hd),
                               keys.reshape(b * n_kv, width, hd).transpose(1, 2), alpha=self.scaling)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs, values.reshape(b * n_kv, width, hd)).view(b, self.n_heads * hd)

    def grouped_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask [b, 1, Q, width] for `grouped_attention`: [b, 1, G * Q, width]."""
        b, _, q_len, width = mask.shape
        return mask.expand(b, self.groups, q_len, width).reshape(b, 1, self.groups * q_len, width)

    def grouped_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          grouped_mask: torch.Tensor) -> torch.Tensor:
        """Queries q [b, Q, heads, hd] over keys and values [b, kv_heads, width, hd] with SDPA
        (GQA: the G query heads of one kv head become G*Q queries against it) -> [b*Q, heads*hd]."""
        b, q_len = q.shape[:2]
        qg = q.transpose(1, 2).reshape(b, self.n_kv, self.groups * q_len, self.head_dim)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=grouped_mask, scale=self.scaling)
        out = out.reshape(b, self.n_heads, q_len, self.head_dim).transpose(1, 2)
        return out.reshape(b * q_len, self.n_heads * self.head_dim)

    def prefill(self) -> torch.Tensor:
        """Logits after each row's pending tokens. Rows sorted by pending length, longest
        first (`TorchSampler` orders them so on CPU), run in passes of similar lengths
        (`padded_ranges`), each cut to its own pending columns and to the key columns from its
        first valid one: most of a tool turn's prefill is otherwise padding."""
        lay = self.layout
        c, p = lay.cache_len, lay.pending_len
        pending = lay.key_valid[:, c : c + p].sum(1).tolist()
        first_key = lay.key_valid[:, : c + p].to(torch.uint8).argmax(1).tolist()
        outs = []
        for r0, r1 in padded_ranges(pending, PREFILL_PASS_OVERHEAD_TOKENS):
            q0 = p - max(pending[r0:r1])  # the range's first pending column, from c
            per_row = max(1, self.groups * (p - q0) * (c + p))
            step = max(1, min(PREFILL_SCORE_BUDGET // per_row, PREFILL_TOKEN_BUDGET // max(p - q0, 1)))
            for start in range(r0, r1, step):
                rows = slice(start, min(r1, start + step))
                k0 = min(first_key[rows])
                outs.append(
                    self._forward(
                        lay.pending_tokens[rows, q0:],
                        lay.pending_positions[rows, q0:],
                        c + q0,
                        c + p,
                        prefill_mask(lay, rows)[:, :, q0:, k0:],
                        [k[rows] for k in self.keys],
                        [v[rows] for v in self.values],
                        k0,
                    )
                )
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, col: int) -> torch.Tensor:
        if col >= self.keys[0].shape[2]:
            self._grow(col)
        if self.graphs is not None:
            return self.graphs.step(tokens, positions, col)
        mask = self.layout.key_valid[:, None, None, : col + 1]
        return self._forward(tokens[:, None], positions[:, None], col, col + 1, mask, self.keys, self.values)

    def decode_static(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        col: torch.Tensor,
        valid: torch.Tensor,
        columns: int,
    ) -> torch.Tensor:
        """`decode` with shapes fixed by `columns` alone: the step attends to the cache's first
        `columns` columns, masked to `valid` [b, >= columns] and to those at or before `col`
        (a [1] tensor, the column written). Every input is a tensor that can be refilled in
        place, so one CUDA graph replays any step whose column is below `columns`."""
        seen = torch.arange(columns, device=col.device) <= col
        mask = (valid[:, :columns] & seen)[:, None, None]
        return self._forward(
            tokens[:, None], positions[:, None], 0, columns, mask, self.keys, self.values, write_col=col
        )

    def _grow(self, col: int) -> None:
        """Double the decode columns (rows usually stop at a tag long before their budget), one
        layer at a time."""
        old = self.keys[0].shape[2]
        prefix = self.layout.cache_len + self.layout.pending_len
        size = min(self.layout.total_len, max(col + 1, prefix + 2 * (old - prefix)))
        for cache in (self.keys, self.values):
            for index, current in enumerate(cache):
                grown = current.new_zeros(*current.shape[:2], size, current.shape[3])
                grown[:, :, :old] = current
                cache[index] = grown
        self.cache_version += 1

    def take(self, spans: list[tuple[int, int, int]], free: bool = False) -> list[Chunk]:
        """The chunks of (slot, start, end) column spans (`take_spans`). `free`: the batch is
        done; its cache is freed one layer at a time as the spans are copied out, so its peak
        stays one layer above the cache instead of holding the cache and its copy."""
        return take_spans(self.keys, self.values, spans, free=free)

    def keep(self, slots: torch.Tensor) -> None:
        for cache in (self.keys, self.values):
            for index, layer in enumerate(cache):
                cache[index] = layer.index_select(0, slots)
        self.cache_version += 1


GRAPH_COLUMNS = 64  # a decode graph covers the columns up to the next multiple of this


class DecodeGraphs:
    """A CUDA LeanBatch's decode steps, each replayed as one CUDA graph.

    At real model sizes an eager GPU decode step is bound by kernel launches: a 0.6B Qwen3's 28
    layers run hundreds of small kernels, 22-25 ms a step at 64 or 256 rows on an H100, 7.7 and
    13 ms as graphs (benchmarks/RESULTS.md, "GPU, second session"). A graph replays them in one
    launch. One graph is captured per (cache tensors, column window): the step attends to the
    columns up to the next multiple of `GRAPH_COLUMNS` (masked beyond the current one), so a
    call of T decode steps captures about T / 64 graphs, plus one after each cache grow or
    batch compaction. Inputs are copied into static buffers before each replay; the logits
    returned are the graph's own output buffer, valid until the next step. Sampling stays
    outside the graph (it draws from the sampler's generator).
    """

    def __init__(self, batch: LeanBatch, capture: bool = True) -> None:
        self.batch = weakref.proxy(batch)  # the batch owns its graphs (no cycle)
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.key: tuple[int, int] | None = None

    def _buffers(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Static inputs for this key's graph; `step` fills tokens, positions and col each call."""
        self.tokens = torch.empty_like(tokens)
        self.positions = torch.empty_like(positions)
        self.col = torch.zeros(1, dtype=torch.long, device=tokens.device)
        self.valid = self.batch.layout.key_valid.clone()

    def _run(self) -> torch.Tensor:
        return self.batch.decode_static(self.tokens, self.positions, self.col, self.valid, self.key[1])

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, col: int) -> torch.Tensor:
        batch = self.batch
        columns = min(batch.keys[0].shape[2], (col // GRAPH_COLUMNS + 1) * GRAPH_COLUMNS)
        key = (batch.cache_version, columns)
        if key != self.key:
            self.graph = self.out = None  # frees the old graph before the new one is captured
            self.key = key
            self._buffers(tokens, positions)
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.col.fill_(col)
        if not self.capture:
            return self._run()
        if self.graph is None:
            captured = capture_or_warn(self._capture, "the decode step")
            if captured is None:
                self.capture = False
                return self._run()
            self.graph, self.out = captured
            return self.out  # the capture's checked replay ran this step
        self.graph.replay()
        return self.out

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        return capture_graph(self._run, self.tokens.device)
