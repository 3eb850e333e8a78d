"""Piecewise CUDA graphs of prompt batches: every part of the forward except attention, per token count.

A prompt batch launches about ten kernels a layer from Python. Where its GPU work is short (a quantized
prefill of ~2k tokens, a BF16 tail of a few tokens), the host, not the GPU, sets the pace (profile in
benchmarks/RESULTS.md). Attention is the only part of a layer that depends on how the tokens split into
sequences; the rest (norms, projections, rotary + KV write, MLP) only on the token count. So for each count
in `capture_sizes` and each (precision, k/v precision) the engine runs prompt batches in, this captures one
graph per stretch between two attentions:

    piece 0        embedding, layer 0 up to its attention (norm, qkv, rotary, KV write)
    piece i        layer i-1 after its attention (o_proj, norm, MLP), layer i up to its attention
    piece L        the last layer after its attention, the final norm

A batch of T tokens is padded to the next captured count (padding rows write their KV into slot 0 of the
reserved page 0); the pieces replay with the batch's attention run eagerly in between on the real rows,
planned as usual. Each piece leaves q/k/v in static buffers and reads attention's output from one, so the
pieces share one memory pool and hold only the residual stream between them. Without CUDA (`capture=False`)
the same pieces run eagerly, which is how CPU tests check the split and the padding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.quant.methods import graph_warmup

log = logging.getLogger("mixquant.piecewise_graph")

Key = tuple[str, str | None]  # (precision, k/v projection precision or None)


def capture_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture: powers of two up to 512, then steps of 256, then max_tokens itself."""
    sizes = [16, 32, 64, 128, 256, 512] + list(range(768, max_tokens, 256))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


class _StaticKV:
    """The attention backend as the captured pieces see it: K/V go to the static slot buffer, and the rotary
    kernel writes q, k and v straight into the static q/k/v buffers (`outs`)."""

    def __init__(self, backend, slots: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
        self.backend, self.slots, self.outs = backend, slots, outs

    def kv_write(self, layer: int, meta):
        write = self.backend.static_kv_write(layer, self.slots)
        return None if write is None else write._replace(q_out=self.outs[0], k_out=self.outs[1],
                                                         v_out=self.outs[2])


class PiecewiseGraphs:
    def __init__(self, model: torch.nn.Module, attn, keys: Iterable[Key], max_tokens: int, device: torch.device,
                 capture: bool = True) -> None:
        self.model, self.attn, self.capture = model.model, attn, capture
        self.keys, self.sizes = tuple(dict.fromkeys(keys)), capture_sizes(max_tokens)
        self.num_layers = len(self.model.layers)
        cfg = model.config
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_tokens, dtype=torch.long, device=device)
        dtype = self.model.embed_tokens.weight.dtype
        self.q = torch.zeros(max_tokens, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(max_tokens, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.attn_out = torch.zeros(max_tokens, cfg.num_heads * cfg.head_dim, dtype=dtype, device=device)
        self.writes_kv = attn.static_kv_write(0, self.slots) is not None
        self.graphs: dict[tuple[Key, int], list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[tuple[Key, int], torch.Tensor] = {}
        if capture:
            self.pool = torch.cuda.graph_pool_handle()
            start, free_before = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
            for key in self.keys:
                for n in reversed(self.sizes):
                    self._capture(key, n)
            used = free_before - torch.cuda.mem_get_info(device)[0]
            log.info("captured piecewise CUDA graphs of prompt batches (%d token counts up to %d, %s) in %.1f s, "
                     "%.0f MiB", len(self.sizes), max_tokens, ", ".join(f"{p}{'/kv ' + kv if kv else ''}"
                                                                        for p, kv in self.keys),
                     time.perf_counter() - start, used / 2**20)

    def padded_size(self, tokens: int) -> int | None:
        return next((s for s in self.sizes if s >= tokens), None)

    def fits(self, tokens: int, key: Key) -> bool:
        return key in self.keys and self.padded_size(tokens) is not None

    # -- the pieces -------------------------------------------------------------------------------
    def _context(self, key: Key, n: int) -> ForwardContext:
        outs = (self.q[:n], self.k[:n], self.v[:n])
        return ForwardContext(key[0], _StaticKV(self.attn, self.slots[:n], outs), None, None, key[1])

    def _piece(self, i: int, n: int, residual: torch.Tensor | None) -> torch.Tensor:
        """Piece i over the first n rows of the static buffers: returns the residual stream (the final
        hidden states for i == num_layers) and leaves layer i's q/k/v in self.q/k/v."""
        layers = self.model.layers
        if i == 0:
            x = self.model.embed_tokens(self.ids[:n])
        else:
            x, residual = layers[i - 1].after_attention(self.attn_out[:n], residual)
        if i == self.num_layers:
            return self.model.norm.add_norm(x, residual)[0]
        q, k, v, _, residual = layers[i].before_attention(self.positions[:n], x, residual)
        for got, buf in ((q, self.q), (k, self.k), (v, self.v)):
            if got.data_ptr() != buf.data_ptr():  # the rotary kernel did not write there itself
                buf[:n].copy_(got)
        return residual

    def _capture(self, key: Key, n: int) -> None:
        with forward_context(self._context(key, n)):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), graph_warmup():  # off the capture: kernel compilation, library handles
                residual = None
                for i in range(self.num_layers + 1):
                    residual = self._piece(i, n, residual)
            torch.cuda.current_stream().wait_stream(stream)
            graphs, residual = [], None
            for i in range(self.num_layers + 1):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._piece(i, n, residual)
                graphs.append(graph)
                residual = out  # the previous piece's output goes back to the pool: only the next one read it
        self.graphs[key, n], self.hidden[key, n] = graphs, residual

    # -- a batch ----------------------------------------------------------------------------------
    def run(self, key: Key, input_ids: torch.Tensor, positions: torch.Tensor, meta,
            layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] of a batch of T tokens (device ids/positions, the backend's `meta`)."""
        t = input_ids.shape[0]
        n = self.padded_size(t)
        self.ids[:t].copy_(input_ids, non_blocking=True)
        self.positions[:t].copy_(positions, non_blocking=True)
        if self.writes_kv:
            self.slots[:t].copy_(meta.slots, non_blocking=True)
            self.slots[t:n].zero_()  # padding rows: slot 0 of the reserved page 0
        residual = None
        for i in range(self.num_layers + 1):
            if self.capture:
                self.graphs[key, n][i].replay()
            else:
                with forward_context(self._context(key, n)):
                    residual = self._piece(i, n, residual)
            if i == self.num_layers:
                break
            out = self.attn.forward(i, self.q[:t], self.k[:t], self.v[:t], meta, kv_stored=self.writes_kv)
            self.attn_out[:t].copy_(out)
            if layer_done is not None:
                layer_done(i)
        return (self.hidden[key, n] if self.capture else residual)[:t]
