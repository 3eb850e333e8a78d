"""Holds the model, the KV storage and the attention backend; turns a Batch into logits.

The batch's phase picks the precision its linear layers run in (the forward context carries it).
Host inputs travel to the device in one pinned, non-blocking copy; on CUDA a decode batch replays a
captured graph (`engine/cuda_graph.py`) unless the graphs are disabled or the batch is larger than
the largest one captured, and a prompt batch of up to --piecewise-cuda-graph-max-tokens tokens replays
the graphs of everything but attention (`engine/piecewise_graph.py`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch

from mixquant_serve.config import ConfigError, EngineConfig, KVLayout, ModelConfig
from mixquant_serve.engine.scheduler import Batch, Phase
from mixquant_serve.kvcache.storage import KVStorage, dtype_name
from mixquant_serve.layers.attention.base import SeqSlice, create_attention_backend
from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.models.loader import build_model, weight_bytes
from mixquant_serve.quant.fp8 import set_fast_accumulation

log = logging.getLogger("mixquant.runner")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config, self.model_config = config, model_config
        self.device, self.dtype = device, dtype
        set_fast_accumulation(config.fp8_fast_accum)
        self.model = build_model(model_config, config.precisions, dtype, device,
                                 quantized_path=config.quantized_model_path)
        self.weight_bytes = weight_bytes(self.model)
        self.layout = KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                               config.page_size, dtype_name(dtype))
        self.storage = KVStorage(self.layout, self._num_pages(), device)
        self.attn = create_attention_backend(config.attention_backend, self.storage, model_config.num_heads,
                                             model_config.num_kv_heads, model_config.head_dim, device)
        self.graphs = None
        if not config.disable_cuda_graph:
            from mixquant_serve.engine.cuda_graph import DecodeGraphs

            max_pages = -(-config.context_length // config.page_size)
            self.graphs = DecodeGraphs(self.model, self.attn, config.decode_precision, config.cuda_graph_max_bs,
                                       max_pages, device)
        self.piecewise = None
        if config.piecewise_cuda_graph_max_tokens:
            from mixquant_serve.engine.piecewise_graph import PiecewiseGraphs

            keys = [(config.prefill_precision, config.kv_proj_precision), (config.decode_precision, None)]
            try:
                self.piecewise = PiecewiseGraphs(self.model, self.attn, keys,
                                                 config.piecewise_cuda_graph_max_tokens, device)
            except Exception as e:  # a kernel that cannot be captured: prompt batches stay eager
                log.warning("piecewise CUDA graphs of prompt batches failed to capture, running them eagerly: %s",
                            e)

    def _num_pages(self) -> int:
        cfg = self.config
        page_bytes = KVStorage.bytes_per_page(self.layout)
        if cfg.max_total_tokens:
            pages = -(-cfg.max_total_tokens // cfg.page_size) + 1
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - cfg.mem_fraction_static)
            pages = int(budget // page_bytes)
        else:
            pages = int(cfg.cpu_kv_cache_gb * 2**30 // page_bytes)
        need = -(-cfg.context_length // cfg.page_size) + 1
        if pages < need:
            raise ConfigError(
                f"the KV cache holds {(pages - 1) * cfg.page_size} tokens, fewer than one request of "
                f"--context-length {cfg.context_length}; raise --max-total-tokens / --cpu-kv-cache-gb "
                f"/ --mem-fraction-static or lower --context-length")
        return pages

    @torch.inference_mode()
    def forward(self, batch: Batch, precision: str, layer_done: Callable[[int], None] | None = None,
                input_ids: torch.Tensor | None = None, kv_precision: str | None = None) -> torch.Tensor | None:
        """Compute the batch's new tokens (writing their KV); logits [num_sampling, vocab] float32.

        input_ids: the new tokens already on the device (a decode step launched ahead, engine/overlap.py);
        by default they are read from the requests. kv_precision: the precision of the qkv projections' k and
        v columns, if not `precision` (Mix-Quant's --bf16-kv-proj)."""
        ids: list[int] = []
        positions: list[int] = []
        seqs = []
        for req, n in zip(batch.reqs, batch.lengths, strict=True):
            start = req.num_computed
            if input_ids is None:
                ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seqs.append(SeqSlice(req.pages, start, n))
        ends = [e - 1 for e in itertools.accumulate(batch.lengths)]
        rows = [e for e, s in zip(ends, batch.sample, strict=True) if s]
        host_ids, pos, row_index = self._to_device(ids, positions, rows)
        input_ids = host_ids if input_ids is None else input_ids
        if self._graph_fits(batch, precision, layer_done):
            return self.graphs.run(input_ids, pos, seqs)
        meta = self.attn.plan(seqs)
        if self.piecewise is not None and self.piecewise.fits(len(pos), (precision, kv_precision)):
            hidden = self.piecewise.run((precision, kv_precision), input_ids, pos, meta, layer_done)
        else:
            with forward_context(ForwardContext(precision, self.attn, meta, layer_done, kv_precision)):
                hidden = self.model(input_ids, pos)
        if not rows:
            return None
        return self.model.compute_logits(hidden[row_index]).float()

    def _graph_fits(self, batch: Batch, precision: str, layer_done: Callable[[int], None] | None) -> bool:
        return (self.graphs is not None and batch.phase is Phase.DECODE and layer_done is None
                and precision == self.graphs.precision and self.graphs.padded_size(len(batch.reqs)) is not None)

    def _to_device(self, *lists: list[int]) -> list[torch.Tensor]:
        """int64 device tensors of the given lists, sent in one copy (pinned and asynchronous on CUDA)."""
        host = torch.tensor(list(itertools.chain(*lists)), dtype=torch.long)
        if self.device.type == "cuda":
            host = host.pin_memory().to(self.device, non_blocking=True)
        return list(host.split([len(x) for x in lists]))
