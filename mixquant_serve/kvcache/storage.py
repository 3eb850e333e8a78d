"""The KV tensors behind the page pool: per layer, K and V of shape [num_pages, page_size, kv_heads, head_dim].

A page is contiguous within each layer, so moving pages (transfer backends) is a gather of whole rows.
"""

from __future__ import annotations

import torch

from mixquant_serve.config import KVLayout

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVStorage:
    def __init__(self, layout: KVLayout, num_pages: int, device: torch.device | str) -> None:
        self.layout = layout
        self.num_pages = num_pages
        shape = (num_pages, layout.page_size, layout.num_kv_heads, layout.head_dim)
        dtype = torch_dtype(layout.dtype)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]

    @staticmethod
    def bytes_per_page(layout: KVLayout) -> int:
        elem = torch.empty((), dtype=torch_dtype(layout.dtype)).element_size()
        return 2 * layout.num_layers * layout.page_size * layout.num_kv_heads * layout.head_dim * elem

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as [num_pages * page_size, kv_heads, head_dim] (token slots)."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
