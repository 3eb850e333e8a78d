"""CUDA graphs of the decode step: the whole model forward plus the LM head, captured once per batch size.

At start-up the runner captures one graph for each size in `capture_sizes(max_bs)` (largest first, all
sharing one memory pool), over static buffers: token ids, positions and the attention backend's decode
metadata (page table, context lengths, KV slots). A decode batch of B requests is padded to the next
captured size: the static buffers are refilled in place (padding rows write to the reserved page 0 and
attend to nothing that matters) and the graph is replayed, so no Python runs per layer or per kernel.
The model files know nothing of this: the runner calls `DecodeGraphs.run` instead of the eager forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from mixquant_serve.layers.attention.base import SeqSlice
from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.quant.methods import graph_warmup

log = logging.getLogger("mixquant.cuda_graph")


def capture_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture: every size up to 8, then steps of 8 to 64, of 16 to 256, of 32 beyond."""
    sizes = [1, 2, 4, 8] + list(range(16, 65, 8)) + list(range(80, 257, 16)) + list(range(288, max_bs + 32, 32))
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, attn, precision: str, max_bs: int, max_pages: int,
                 device: torch.device) -> None:
        self.model, self.attn, self.precision = model, attn, precision
        self.sizes = capture_sizes(max_bs)
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.static_meta = attn.static_decode_meta(max_bs, max_pages)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
        for bs in reversed(self.sizes):
            self._capture(bs)
        used = free_before - torch.cuda.mem_get_info(device)[0]
        log.info("captured %d decode CUDA graphs (batch 1..%d) in %.1f s, %.0f MiB", len(self.sizes), max_bs,
                 time.perf_counter() - start, used / 2**20)

    def _forward(self, bs: int, meta) -> torch.Tensor:
        with forward_context(ForwardContext(self.precision, self.attn, meta)):
            hidden = self.model(self.ids[:bs], self.positions[:bs])
            return self.model.compute_logits(hidden).float()

    def _capture(self, bs: int) -> None:
        # one real-looking row (page 0, the reserved padding page) and bs - 1 padding rows
        meta = self.attn.load_decode_meta(self.static_meta, [SeqSlice([0], 0, 1)], bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), graph_warmup():  # off the capture: kernel compilation, library handles
            self._forward(bs, meta)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[bs] = self._forward(bs, meta)
        self.graphs[bs] = graph

    def padded_size(self, bs: int) -> int | None:
        return next((s for s in self.sizes if s >= bs), None)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, seqs: Sequence[SeqSlice]) -> torch.Tensor:
        """Logits ``[B, vocab]`` float32 of a decode batch (ids/positions: device tensors of B rows)."""
        bs = len(seqs)
        padded = self.padded_size(bs)
        self.ids[:bs].copy_(ids, non_blocking=True)
        self.positions[:bs].copy_(positions, non_blocking=True)
        if padded > bs:
            self.ids[bs:padded].zero_()
            self.positions[bs:padded].zero_()
        self.attn.load_decode_meta(self.static_meta, seqs, padded)
        self.graphs[padded].replay()
        return self.logits[padded][:bs]
