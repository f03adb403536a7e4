"""KvtierCache: a transformers Cache whose storage is a kvtier Engine.

How a forward pass reaches the engine. The attention modules of Llama, Mistral and Qwen2 call
``past_key_values.update(k, v, layer_idx)`` and then the attention function with the query and
whatever update returned. ``update`` never sees the query, so it stores nothing: it counts the
tokens (``get_seq_length`` and the masks need the count), marks k so the attention function can
find the layer, and returns k and v as they came. The kvtier attention function
(``kvtier.attention``) then does the work with all of q, k and v in hand:

- prefill (the layer's first forward): dense attention (SDPA, honoring the mask) over the
  prompt, then the engine takes each sequence's prompt K/V (left padding skipped) and, for
  clusterattn and hybrid, the last ``observation_window`` queries;
- decode (one new token): the engine appends the token's K/V and writes attention over
  everything it keeps for the sequence, all in one ``decode_layer`` call per layer. So each token
  is appended exactly once, by the engine, and after the model's last layer on a device the step
  ends there (``end_step``).

One engine per device: with a ``device_map`` each engine holds the layers of its device, and
tensors on the CPU use the engine's CPU backend. Engines are made at the first prefill, when the
batch size is known; ``reset()`` frees them so the cache can take a new prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import _core
from ._model import ModelSpec, inspect_model

#: Engine modes: every row attended (full), per-step cluster recall (clusterkv), prefill-time
#: selection by density clustering of observation-window votes (clusterattn), both (hybrid).
MODES = ("full", "clusterkv", "clusterattn", "hybrid")

#: EngineConfig fields a user may set through enable()/KvtierCache (docs/engine.md).
ENGINE_OPTIONS = (
    "total_budget",
    "resident_budget",
    "sink",
    "window",
    "tokens_per_cluster",
    "initial_clusters",
    "window_clusters",
    "retention_steps",
    "mean_key_scores",
    "page_size",
    "num_dense_layers",
    "kmeans_iters",
    "observation_window",
    "dbac_eps",
    "dbac_min_density_ratio",
    "dbac_coverage",
    "dbac_floor_fraction",
    "dbac_recent_share",
    "dbac_fill_recent",
    "cache_bytes",
    "telemetry_path",
    "cuda_graphs",
)

#: The name the attention function is registered under (model.config._attn_implementation).
ATTN_IMPLEMENTATION = "kvtier"

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

#: Modes whose prefill needs the observation window's queries.
_WINDOW_MODES = ("clusterattn", "hybrid")


def _check_settings(mode, budget, max_context, host_bytes_limit, options) -> None:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"kvtier: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"kvtier: budget must be a positive number of tokens, got {budget!r}")
    if max_context is not None and (not isinstance(max_context, int) or max_context <= 0):
        raise ValueError(
            f"kvtier: max_context must be a positive number of tokens, got {max_context!r}"
        )
    if host_bytes_limit is not None and (
        not isinstance(host_bytes_limit, int) or host_bytes_limit <= 0
    ):
        raise ValueError(
            f"kvtier: host_bytes_limit must be a positive byte count, got {host_bytes_limit!r}"
        )
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(
            f"kvtier: unknown option(s) {', '.join(unknown)}; the engine options are "
            f"{', '.join(ENGINE_OPTIONS)}"
        )


def _layout(t: torch.Tensor) -> tuple:
    """Strides that matter: an extent-1 dimension's stride is arbitrary (torch reports various
    values for it), so it does not count when comparing the layouts of K and V."""
    return tuple(s if n > 1 else None for n, s in zip(t.shape, t.stride()))


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


@dataclass
class _DeviceEngine:
    """The engine of one device and the model layers it holds."""

    engine: _core.Engine
    device: torch.device
    local: dict[int, int]  # model layer -> engine layer
    last_layer: int  # the model's last layer on this device: the step ends after it

    def stream(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.current_stream(self.device).cuda_stream
        return 0


class KvtierLayer(CacheLayerMixin):
    """One layer's view of a KvtierCache: token counts for masks and positions; the rows
    themselves live in the engine."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    # There is nothing to allocate ahead: storage is the engine's.
    supports_early_init = False

    def __init__(self, cache: KvtierCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.length = 0  # tokens seen, left padding included (as DynamicCache counts them)
        self.prefilled = False
        self.pending = False  # update() ran and the kvtier attention function has not yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending:
            raise RuntimeError(
                "kvtier: the previous forward's attention did not run through kvtier, so the "
                "engine never received its keys and values; call kvtier.enable(model) (or load "
                f"the model with attn_implementation='{ATTN_IMPLEMENTATION}') before using a "
                "KvtierCache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = True
        if self.cache._row_prefill is None:
            self.length += key_states.shape[-2]
        # The attention function receives exactly this tensor: the mark leads it back here.
        key_states._kvtier_layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0
        self.prefilled = False
        self.pending = False
        self.is_initialized = False

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"kvtier: {what} is not supported: the engine keeps each sequence's rows in its own "
            "tiers and cannot reorder, crop or copy them"
        )

    def reorder_cache(self, beam_idx):
        if self.length:
            self._unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int):
        if tokens_to_remove:
            self._unsupported("crop")

    def batch_repeat_interleave(self, repeats: int):
        if self.length and repeats != 1:
            self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        if self.length:
            self._unsupported("batch_select_indices")

    def offload(self):  # the engine decides where rows live
        pass

    def prefetch(self):
        pass


@dataclass
class _Settings:
    mode: str
    budget: int
    max_context: int | None
    host_bytes_limit: int | None
    options: dict = field(default_factory=dict)


class KvtierCache(Cache):
    """A transformers Cache that keeps the KV cache in kvtier's engine.

    Args:
        model: a Llama, Mistral or Qwen2 transformers model (any placement, device_map included).
        mode: "full", "clusterkv", "clusterattn" or "hybrid".
        budget: rows recalled per KV head and step (clusterkv, hybrid), or kept per KV head on
            average at prefill (clusterattn, hybrid).
        max_context: most tokens per sequence (prompt + generated); sizes the engine's tables.
            Default: the model's max_position_embeddings, and no more than its sliding window.
        host_bytes_limit: cap of each engine's host tier. Default: what max_context tokens of
            the batch need, at most three quarters of physical memory.
        **options: engine options (ENGINE_OPTIONS, see docs/engine.md), e.g. sink=16, window=256.

    The model must use the kvtier attention function (kvtier.enable(model, ...) sets it). Use a
    new cache (or reset() this one) for each generate() call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mode: str = "clusterkv",
        budget: int = 2048,
        *,
        max_context: int | None = None,
        host_bytes_limit: int | None = None,
        **options,
    ):
        _check_settings(mode, budget, max_context, host_bytes_limit, options)
        spec = inspect_model(model)
        if spec.sliding_window is not None:
            # kvtier attends the whole context; the two agree while the context fits the window.
            if max_context is None:
                max_context = spec.sliding_window
                if spec.max_positions:
                    max_context = min(max_context, int(spec.max_positions))
            elif max_context > spec.sliding_window:
                raise ValueError(
                    f"kvtier: this model attends a sliding window of {spec.sliding_window} tokens "
                    f"and kvtier attends the whole context, so max_context ({max_context}) must "
                    f"not exceed the window"
                )
        self.spec: ModelSpec = spec
        self.settings = _Settings(mode, budget, max_context, host_bytes_limit, dict(options))
        super().__init__(layers=[KvtierLayer(self, i) for i in range(spec.num_layers)])
        self._engines: dict[torch.device, _DeviceEngine] = {}
        self._of_layer: dict[int, _DeviceEngine] = {}
        self._batch = 0
        self._starts: list[int] | None = None  # first real (unpadded) prompt position per row
        # With record_lse set, each decode step keeps, per layer, the log-sum-exp of the scaled
        # logits over the rows the engine attended ([B, num_q_heads] float32) in last_lse: with
        # the full cache's log-sum-exp L, exp(lse - L) is the share of attention weight they hold.
        self.record_lse = False
        self.last_lse: dict[int, torch.Tensor] = {}
        # During prefill(): the sequence (batch row) the model's batch-1 forward belongs to.
        self._row_prefill: int | None = None
        # Check everything the engines will check, now rather than at the first forward: mode,
        # budget and options, head_dim, dtype and backend (e.g. hybrid on CUDA) per device.
        dtype = spec.weight_dtype()
        for device, layers in self._layers_by_device().items():
            self._engine_config(device, layers, dtype, batch=1).validate()

    # ---- transformers Cache API (the rest comes from Cache over the layers) ----

    def reset(self) -> None:
        """Drops the engines and every stored row; the cache can then take a new prompt."""
        for group in self._engines.values():
            group.engine.close()
        self._engines.clear()
        self._of_layer.clear()
        self._batch = 0
        self._starts = None
        self._row_prefill = None
        super().reset()

    @torch.no_grad()
    def prefill(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """Runs the prompts of a batch through `model` one sequence at a time, so that a batch
        whose prompts would not fit the GPU together (a prefill's activations grow with batch x
        prompt length) can still decode together. Then call
        ``model.generate(input_ids, attention_mask=attention_mask, past_key_values=self, ...)``
        with the same tensors: generate sees every prompt token but the last in the cache and
        continues from there, every step for the whole batch at once.

        input_ids: [B, L]; attention_mask: [B, L] of 0/1 with left padding (as tokenizers make
        it with padding_side="left"), or None. Each row is run without its padding, at positions
        0..n-2 for its n real tokens; its last token is the first one generate feeds. Every
        prompt needs at least 2 real tokens.
        """
        if self._starts is not None:
            raise ValueError(
                "kvtier: prefill() needs an empty cache: use a new KvtierCache (or reset())"
            )
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(
                f"kvtier: prefill() takes input_ids of shape [batch, length >= 2], got "
                f"{tuple(input_ids.shape)}"
            )
        batch, length = input_ids.shape
        if attention_mask is None:
            starts = [0] * batch
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"kvtier: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                    f"{tuple(input_ids.shape)}"
                )
            real = attention_mask.bool()
            count = real.sum(dim=-1)
            positions = torch.arange(length, device=real.device)
            if not torch.equal(real, positions[None, :] >= (length - count)[:, None]):
                raise ValueError(
                    "kvtier: the prompts must be left-padded (tokenizer.padding_side = 'left'): "
                    "a row's real tokens have to be its last ones"
                )
            starts = (length - count).tolist()
        if any(length - start < 2 for start in starts):
            raise ValueError("kvtier: prefill() needs at least 2 real tokens in every prompt")
        self._batch, self._starts = batch, list(starts)
        try:
            for seq, start in enumerate(starts):
                self._row_prefill = seq
                ids = input_ids[seq : seq + 1, start : length - 1]
                model(input_ids=ids, past_key_values=self, use_cache=True, logits_to_keep=1)
                missing = [layer.layer_idx for layer in self.layers if layer.pending]
                if missing:
                    raise RuntimeError(
                        f"kvtier: layers {missing} did not run through kvtier attention; call "
                        "kvtier.enable(model) before prefill()"
                    )
        except BaseException:
            self.reset()
            raise
        finally:
            self._row_prefill = None
        for layer in self.layers:
            layer.length = length - 1  # as generate counts it: left padding included
            layer.prefilled = True

    # ---- kvtier ----

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def budget(self) -> int:
        return self.settings.budget

    def engine_stats(self) -> dict[str, _core.EngineStats]:
        """EngineStats of each engine, by device ("cpu", "cuda:0", ...)."""
        return {str(d): g.engine.stats() for d, g in self._engines.items()}

    def last_selection(self, layer_idx: int, row: int = 0) -> list[list[int]]:
        """The cluster ids, per KV head in selection order, that model layer `layer_idx` recalled
        for batch row `row` in the last decode step (empty for a layer that does not recall)."""
        group = self._of_layer.get(layer_idx)
        if group is None:
            return []
        return group.engine.last_selection(row, group.local[layer_idx])

    def engines(self) -> dict[str, _core.Engine]:
        """The engines made so far, by device."""
        return {str(d): g.engine for d, g in self._engines.items()}

    def _layers_by_device(self) -> dict[torch.device, list[int]]:
        groups: dict[torch.device, list[int]] = {}
        for idx, device in enumerate(self.spec.layer_devices()):
            groups.setdefault(device, []).append(idx)
        return groups

    def _engine_config(
        self, device: torch.device, layers: list[int], dtype: torch.dtype, batch: int
    ) -> _core.EngineConfig:
        if dtype not in _DTYPES:
            raise ValueError(
                f"kvtier: KV dtype {dtype} is not supported (float16, bfloat16, float32)"
            )
        s, spec = self.settings, self.spec
        if device.type == "cuda" and not _core.built_with_cuda():
            raise ValueError(
                "kvtier: the model is on a GPU but this kvtier build has no CUDA backend "
                "(reinstall with nvcc on PATH and KVTIER_WITH_CUDA unset)"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"kvtier: device {device} is not supported (cpu or cuda)")
        c = _core.EngineConfig()
        c.num_layers = len(layers)
        c.num_q_heads = spec.num_q_heads
        c.num_kv_heads = spec.num_kv_heads
        c.head_dim = spec.head_dim
        c.dtype = _DTYPES[dtype]
        c.mode = s.mode
        c.backend = "cuda" if device.type == "cuda" else "cpu"
        c.device = device.index if device.type == "cuda" and device.index is not None else 0
        c.budget = s.budget
        for name, value in s.options.items():
            setattr(c, name, value)
        path = s.options.get("telemetry_path")
        if path and len(self._layers_by_device()) > 1:
            # One file per engine: run.jsonl -> run.cuda1.jsonl for the engine of cuda:1.
            root, ext = os.path.splitext(path)
            c.telemetry_path = f"{root}.{device.type}{device.index or 0}{ext}"
        # The model's first num_dense_layers layers stay dense; an engine counts its own layers,
        # and a device's share of them is a prefix of its layers (layers are in model order).
        dense = s.options.get("num_dense_layers", c.num_dense_layers)
        c.num_dense_layers = sum(1 for layer in layers if layer < dense)
        c.max_sequences = batch
        c.max_batch = batch
        if s.max_context is not None:
            c.max_context = s.max_context
        elif spec.max_positions:
            c.max_context = int(spec.max_positions)
        if s.host_bytes_limit is not None:
            c.host_bytes_limit = s.host_bytes_limit
        else:
            # K and V of every row, with room for partly filled pages, capped by the machine.
            row = 2 * spec.num_kv_heads * spec.head_dim * torch.finfo(dtype).bits // 8
            need = batch * c.max_context * len(layers) * row * 5 // 4 + (256 << 20)
            c.host_bytes_limit = max(512 << 20, min(need, _physical_memory() * 3 // 4))
        return c

    def _group(self, layer_idx: int, device: torch.device, dtype: torch.dtype) -> _DeviceEngine:
        group = self._of_layer.get(layer_idx)
        if group is not None:
            return group
        layers = self._layers_by_device().get(device)
        if not layers or layer_idx not in layers:
            raise RuntimeError(
                f"kvtier: layer {layer_idx}'s keys are on {device}, not where its weights are"
            )
        engine = _core.Engine(self._engine_config(device, layers, dtype, self._batch))
        for seq in range(self._batch):
            engine.add_sequence(seq)
        group = _DeviceEngine(engine, device, {l: i for i, l in enumerate(layers)}, max(layers))
        self._engines[device] = group
        for layer in layers:
            self._of_layer[layer] = group
        return group

    def _prompt_starts(self, attention_mask, batch: int, length: int) -> list[int]:
        """First real position of each prompt row. kvtier needs left padding: the real tokens
        of a row are its last ones, which the last query's row of the mask shows."""
        if attention_mask is None:
            return [0] * batch
        if attention_mask.dim() != 4:
            raise ValueError(
                f"kvtier: expected a 4-D attention mask at prefill, got shape "
                f"{tuple(attention_mask.shape)}"
            )
        last = attention_mask[:, 0, -1, -length:].expand(batch, length)
        valid = last if last.dtype == torch.bool else last == 0  # additive masks: 0 = attend
        starts = (~valid).sum(dim=-1)
        positions = torch.arange(length, device=valid.device)
        if not torch.equal(valid, positions[None, :] >= starts[:, None]):
            raise ValueError(
                "kvtier: the prompts must be left-padded (tokenizer.padding_side = 'left'): a "
                "row's real tokens have to be its last ones"
            )
        return starts.tolist()

    def _prefill_layer(self, layer: KvtierLayer, query, key, value, attention_mask) -> None:
        batch, _, length, _ = query.shape
        if self._row_prefill is not None:
            # prefill(): one sequence's forward, its padding already cut off.
            rows = [(self._row_prefill, 0)]
        else:
            if self._starts is None:
                self._batch = batch
                self._starts = self._prompt_starts(attention_mask, batch, length)
            elif batch != self._batch:
                raise ValueError(
                    f"kvtier: batch of {batch} at layer {layer.layer_idx}, {self._batch} before"
                )
            rows = list(enumerate(self._starts))
        group = self._group(layer.layer_idx, key.device, key.dtype)
        local = group.local[layer.layer_idx]
        stream = group.stream()
        window = self.settings.options.get(
            "observation_window", group.engine.config.observation_window
        )
        query, key, value = query.detach(), key.detach(), value.detach()
        for index, (seq, start) in enumerate(rows):
            count = length - start
            if count == 0:
                continue  # an all-padding row: the engine starts it empty at its first decode
            k, v = key[index, :, start:, :], value[index, :, start:, :]
            if _layout(k) != _layout(v) or k.stride(-1) != 1:
                k, v = k.contiguous(), v.contiguous()
            q_window = None
            if self.settings.mode in _WINDOW_MODES:
                w = min(window, count)
                q_window = query[index, :, length - w :, :].contiguous()
            group.engine.prefill_layer(seq, local, k, v, q_window, stream)

    def _decode_layer(self, layer: KvtierLayer, query, key, value) -> torch.Tensor:
        group = self._of_layer.get(layer.layer_idx)
        if group is None:
            raise RuntimeError(f"kvtier: layer {layer.layer_idx} decodes before its prefill")
        batch = query.shape[0]
        if batch != self._batch:
            raise ValueError(f"kvtier: batch of {batch} in decode, {self._batch} at prefill")
        q = query.detach()[:, :, 0, :].contiguous()
        k = key.detach()[:, :, 0, :].contiguous()
        v = value.detach()[:, :, 0, :].contiguous()
        out = torch.empty_like(q)
        stream = group.stream()
        lse = None
        if self.record_lse:
            lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
            self.last_lse[layer.layer_idx] = lse
        group.engine.decode_layer(
            group.local[layer.layer_idx], list(range(batch)), q, k, v, out, stream, lse
        )
        if layer.layer_idx == group.last_layer:
            group.engine.end_step(stream)
        return out.unsqueeze(1)  # [B, 1, Hq, D]: the layout attention functions return
