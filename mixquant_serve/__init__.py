"""mixquant-serve: LLM serving for agents with NVFP4 prefill and BF16 decode.

`Engine` (the offline API) is imported lazily so that light users (the router) never import torch.
"""

from mixquant_serve.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":
        from mixquant_serve.engine.engine import Engine

        return Engine
    raise AttributeError(name)
