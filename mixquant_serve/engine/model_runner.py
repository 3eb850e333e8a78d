"""Holds the model, the KV storage and the attention backend; turns a Batch into logits.

The batch's phase picks the precision its linear layers run in (the forward context carries it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from mixquant_serve.config import ConfigError, EngineConfig, KVLayout, ModelConfig
from mixquant_serve.engine.scheduler import Batch
from mixquant_serve.kvcache.storage import KVStorage, dtype_name
from mixquant_serve.layers.attention.base import SeqSlice, create_attention_backend
from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.models.loader import build_model, weight_bytes

log = logging.getLogger("mixquant.runner")


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.config, self.model_config = config, model_config
        self.device, self.dtype = device, dtype
        self.model = build_model(model_config, config.precisions, dtype, device,
                                 quantized_path=config.quantized_model_path)
        self.weight_bytes = weight_bytes(self.model)
        self.layout = KVLayout(model_config.num_layers, model_config.num_kv_heads, model_config.head_dim,
                               config.page_size, dtype_name(dtype))
        self.storage = KVStorage(self.layout, self._num_pages(), device)
        self.attn = create_attention_backend(config.attention_backend, self.storage, model_config.num_heads,
                                             model_config.num_kv_heads, model_config.head_dim, device)

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
    def forward(self, batch: Batch, precision: str,
                layer_done: Callable[[int], None] | None = None) -> torch.Tensor | None:
        """Compute the batch's new tokens (writing their KV); logits [num_sampling, vocab] float32."""
        ids: list[int] = []
        positions: list[int] = []
        seqs = []
        for req, n in zip(batch.reqs, batch.lengths, strict=True):
            start = req.num_computed
            ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seqs.append(SeqSlice(req.pages, start, n))
        meta = self.attn.plan(seqs)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with forward_context(ForwardContext(precision, self.attn, meta, layer_done)):
            hidden = self.model(input_ids, pos)
        ends = torch.tensor(batch.lengths).cumsum(0) - 1
        rows = ends[torch.tensor(batch.sample, dtype=torch.bool)]
        if rows.numel() == 0:
            return None
        return self.model.compute_logits(hidden[rows.to(self.device)]).float()
