"""Peer KV-selection methods for accuracy evaluation (kvtier.eval), apart from the engine.

Each method decides which cached tokens every KV head attends at a decode step, at a token budget
per KV head; attention then runs over exactly those tokens. The full K/V stays in a DynamicCache
and the selection is applied as a mask, so the output equals the method's (what it would compute
with only the selected rows in memory) without implementing its memory management:

- ``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``sink`` tokens and the most recent
  ``budget - sink``.
- ``snapkv`` (SnapKV, Li et al. 2024): at prefill, the last ``window`` queries vote on the prompt
  (softmax attention weights summed over the window and the KV head's query heads, then
  max-pooled over ``kernel`` neighbours); each KV head keeps its top ``budget - window`` prompt
  tokens and the window. Tokens generated afterwards are all kept. Prefill-only, like the paper.
- ``quest`` (Quest, Tang et al. 2024): keys in pages of ``page`` tokens, each page summarised by
  its per-channel minimum and maximum; at each step a page's score is the upper bound
  sum_d max(q_d min_d, q_d max_d), taken over the KV head's query heads (maximum), and the
  best pages are attended up to ``budget`` tokens; the page being filled is always attended.
- ``full``: every token (the reference).

Prefill attention is dense (SDPA) for every method, as in the papers. Tokens keep their original
positions (StreamingLLM re-numbers positions within its cache; within the model's trained context
the two agree). Batches must not be left-padded (one sequence, or prompts of one length): the
sink, the pages and the window are counted from position 0.

    cache = kvtier.peers.enable(model, "snapkv", budget=512)
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: The methods, by name.
METHODS = ("full", "streaming", "snapkv", "quest")
#: The attention implementation name the peers' attention function is registered under.
ATTN_IMPLEMENTATION = "kvtier_peer"


class PeerCache(DynamicCache):
    """A DynamicCache whose decode attention a peer method restricts to a token budget.

    Args:
        model: the transformers model (its config sizes the cache).
        method: one of METHODS.
        budget: tokens per KV head attended at a decode step.
        sink: StreamingLLM's sink tokens. window, kernel: SnapKV's observation window and
            pooling. page: Quest's page size.
    """

    def __init__(
        self,
        model,
        method: str,
        budget: int,
        *,
        sink: int = 4,
        window: int = 32,
        kernel: int = 7,
        page: int = 16,
    ):
        if method not in METHODS:
            raise ValueError(f"kvtier.peers: unknown method {method!r}; expected one of {METHODS}")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"kvtier.peers: budget must be a positive int, got {budget!r}")
        if kernel <= 0 or kernel % 2 == 0:
            raise ValueError(f"kvtier.peers: SnapKV's pooling kernel must be odd, got {kernel}")
        super().__init__(config=model.config)
        self.method, self.budget = method, budget
        self.sink, self.window, self.kernel, self.page = sink, window, kernel, page
        self.prompt_len: dict[int, int] = {}  # layer -> prompt tokens
        self.snap_keep: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, prompt] bool
        self.attended = 0  # (token, KV head) pairs attended in decode, summed over layers
        self.decode_calls = 0
        self.kv_heads = model.config.num_key_value_heads

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        # A weak reference: the cache holds `keys`, and a strong one would make a cycle that only
        # the garbage collector frees (with the whole K/V).
        keys._kvtier_peer = (weakref.ref(self), layer_idx)
        return keys, values

    # ---- selection ----

    def observe_prefill(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, mask, scaling=None
    ) -> None:
        """query [B, Hq, L, D], key [B, Hkv, L, D] of the prompt; `mask` as SDPA takes it;
        `scaling` the attention's (default 1/sqrt(D))."""
        self.prompt_len[layer] = key.shape[2]
        if self.method != "snapkv":
            return
        b, hq, length, d = query.shape
        hkv = key.shape[1]
        w = min(self.window, length, self.budget)
        prefix = length - w
        keep = torch.ones(b, hkv, length, dtype=torch.bool, device=key.device)
        if prefix > 0 and self.budget - w < prefix:
            q = query[:, :, -w:, :].float()
            k = key.float().repeat_interleave(hq // hkv, dim=1)
            scale = scaling if scaling is not None else d**-0.5
            scores = q @ k.transpose(-1, -2) * scale  # [B, Hq, w, L]
            causal = torch.ones(w, length, dtype=torch.bool, device=key.device).tril(prefix)
            allowed = causal[None, None]
            if mask is not None and mask.dtype == torch.bool:
                allowed = allowed & mask[:, :, -w:, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = scores.softmax(dim=-1)[..., :prefix]  # votes on the prefix only
            votes = weights.sum(dim=2).view(b, hkv, hq // hkv, prefix).sum(dim=2)
            votes = F.max_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2)
            top = votes.topk(max(self.budget - w, 0), dim=-1).indices
            keep[:, :, :prefix] = False
            keep[:, :, :prefix].scatter_(-1, top, True)
        self.snap_keep[layer] = keep

    def decode_mask(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, L] bool: the tokens each KV head attends this step (query [B, Hq, 1, D])."""
        b, hkv, length, _ = key.shape
        pos = torch.arange(length, device=key.device)
        if self.method == "full" or length <= self.budget:
            sel = torch.ones(b, hkv, length, dtype=torch.bool, device=key.device)
        elif self.method == "streaming":
            sink = min(self.sink, self.budget)
            row = (pos < sink) | (pos >= length - (self.budget - sink))
            sel = row.expand(b, hkv, length)
        elif self.method == "snapkv":
            keep = self.snap_keep[layer]
            prompt = keep.shape[-1]
            sel = torch.ones(b, hkv, length, dtype=torch.bool, device=key.device)
            sel[:, :, :prompt] = keep
        else:  # quest
            sel = self._quest(query, key)
        self.attended += int(sel.sum().item()) // b
        self.decode_calls += 1
        return sel

    def _quest(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        b, hkv, length, d = key.shape
        hq = query.shape[1]
        p = self.page
        pages = (length + p - 1) // p
        padded = F.pad(key.float(), (0, 0, 0, pages * p - length))
        blocks = padded.view(b, hkv, pages, p, d)
        # Padding rows must not widen the last page's bounds: use its real rows' extremes.
        valid = (torch.arange(pages * p, device=key.device) < length).view(pages, p, 1)
        big = torch.finfo(torch.float32).max
        kmin = blocks.masked_fill(~valid, big).amin(dim=3)  # [B, Hkv, P, D]
        kmax = blocks.masked_fill(~valid, -big).amax(dim=3)
        q = query[:, :, 0, :].float().view(b, hkv, hq // hkv, 1, d)
        bound = torch.maximum(q * kmin[:, :, None], q * kmax[:, :, None]).sum(-1)  # [B,Hkv,G,P]
        score = bound.amax(dim=2)  # [B, Hkv, P]
        score[:, :, -1] = float("inf")  # the page being filled
        take = min(pages, max(1, self.budget // p))
        top = score.topk(take, dim=-1).indices
        page_sel = torch.zeros(b, hkv, pages, dtype=torch.bool, device=key.device)
        page_sel.scatter_(-1, top, True)
        return page_sel.repeat_interleave(p, dim=-1)[..., :length]

    def attended_per_head_step(self) -> float:
        """Mean tokens a KV head attended per decode step and layer."""
        if not self.decode_calls:
            return float("nan")
        return self.attended / (self.decode_calls * self.kv_heads)


def peer_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
):
    """The attention function of PeerCache: dense at prefill (the method observes it), masked to
    the method's selection in decode. Without a PeerCache it is plain SDPA."""
    tag = getattr(key, "_kvtier_peer", None)
    cache = tag[0]() if tag is not None else None
    if cache is None or query.shape[2] > 1 and key.shape[2] == query.shape[2]:
        if cache is not None:
            _refuse_padding(attention_mask)
            cache.observe_prefill(tag[1], query, key, attention_mask, scaling)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = tag[1]
    if query.shape[2] != 1:
        raise ValueError("kvtier.peers: after the prompt one token per step is supported")
    _refuse_padding(attention_mask)
    sel = cache.decode_mask(layer, query, key)  # [B, Hkv, L]
    hq, hkv = query.shape[1], key.shape[1]
    allowed = sel.repeat_interleave(hq // hkv, dim=1)[:, :, None, :]  # [B, Hq, 1, L]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask[..., -key.shape[2] :]
        else:
            allowed = allowed & (attention_mask[..., -key.shape[2] :] == 0)
    return sdpa_attention_forward(
        module, query, key, value, allowed, dropout=dropout, scaling=scaling, **kwargs
    )


def _refuse_padding(mask) -> None:
    """The peers count positions from 0: a left-padded row would put its sink on padding."""
    if mask is None:
        return
    last = mask[:, :, -1, :]  # the last query's row: every real key of the sequence
    padded = ~last if last.dtype == torch.bool else last != 0
    if bool(padded.any()):
        raise ValueError(
            "kvtier.peers: left-padded batches are not supported (run one sequence, or prompts "
            "of one length)"
        )


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, peer_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable(model, method: str, budget: int, **options) -> PeerCache:
    """Switches `model` to the peers' attention function; returns a PeerCache for one
    generate() (or forward loop)."""
    register()
    cache = PeerCache(model, method, budget, **options)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return cache
