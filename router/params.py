"""From an OpenAI request to the SamplingParams of each choice, with every check that earns a 400."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mixquant_serve.sampling_params import MAX_TOP_LOGPROBS, InvalidSamplingParams, SamplingParams
from router.errors import APIError
from router.openai_api import ChatCompletionRequest, CompletionRequest, SamplingRequest

MAX_N = 16
log = logging.getLogger("router")


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def check_common(req: SamplingRequest) -> None:
    if not 1 <= req.n <= MAX_N:
        raise bad(f"n must be in [1, {MAX_N}] (got {req.n})", "n")
    if req.logit_bias:
        raise bad("logit_bias is not supported", "logit_bias")
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")


def check_chat(req: ChatCompletionRequest) -> None:
    check_common(req)
    response_schema(req)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")


def check_completion(req: CompletionRequest) -> None:
    check_common(req)
    if req.suffix:
        raise bad("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad("best_of other than n is not supported", "best_of")
    if req.echo and req.logprobs is not None:
        raise bad("echo together with logprobs is not supported (no prompt logprobs)", "echo")


def response_schema(req: SamplingRequest) -> str | None:
    """The JSON Schema (text) a `response_format` asks the output to follow; None for plain text."""
    fmt = getattr(req, "response_format", None) or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        return json.dumps(schema)
    raise bad(f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
              "response_format")


def chat_logprobs(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a sampling field out gets: OpenAI's defaults, or the model's own
    recommendation from its generation_config.json (`--sampling-defaults model`, as SGLang and vLLM do)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def load(cls, model_path: str, source: str) -> SamplingDefaults:
        path = Path(model_path) / "generation_config.json"
        if source != "model" or not path.is_file():
            return cls()
        try:
            gen = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("ignoring %s: %s", path, e)
            return cls()
        found = {}
        for f in dataclasses.fields(cls):
            value = gen.get(f.name) if isinstance(gen, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[f.name] = type(f.default)(value)  # int for top_k, float for the others
        defaults = cls(**found)
        try:
            defaults.params().validate()
        except InvalidSamplingParams as e:
            log.warning("ignoring the sampling defaults of %s: %s", path, e)
            return cls()
        return defaults

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty)


def base_params(req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                extra_stop: tuple[str, ...] = (), defaults: SamplingDefaults = SamplingDefaults(),
                grammar: str | None = None) -> SamplingParams:
    """Parameters before the prompt is known: max_tokens may still be None ("up to the context").
    A tool-call grammar replaces the response_format schema (it embeds it where it still applies)."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    stop += tuple(s for s in extra_stop if s not in stop)
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        top_k=defaults.top_k if req.top_k is None else req.top_k,
        min_p=defaults.min_p if req.min_p is None else req.min_p,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        repetition_penalty=defaults.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        json_schema=None if grammar is not None else response_schema(req),
        grammar=grammar,
    )
    try:
        params.validate()
    except InvalidSamplingParams as e:
        raise bad(str(e), _param_name(req, e.param)) from None
    return params


def _param_name(req: SamplingRequest, field: str) -> str:
    if field == "max_tokens" and getattr(req, "max_completion_tokens", None) is not None:
        return "max_completion_tokens"
    return field


def fit_context(params: SamplingParams, prompt_len: int, context_length: int, prompt_param: str
                ) -> SamplingParams:
    """Check the prompt against the context length and fill in the default max_tokens."""
    if prompt_len >= context_length:
        raise bad(f"This model's maximum context length is {context_length} tokens, and the prompt has "
                  f"{prompt_len} tokens; no room is left to generate.", prompt_param,
                  "context_length_exceeded")
    room = context_length - prompt_len
    if params.max_tokens is None:
        if params.min_tokens > room:
            raise bad(f"min_tokens ({params.min_tokens}) does not fit in the {room} tokens left after the "
                      f"prompt", "min_tokens", "context_length_exceeded")
        return _with(params, max_tokens=room)
    if params.max_tokens > room:
        raise bad(f"This model's maximum context length is {context_length} tokens. However, you requested "
                  f"{prompt_len + params.max_tokens} tokens ({prompt_len} in the prompt, {params.max_tokens} "
                  f"for the completion).", "max_tokens", "context_length_exceeded")
    return params


def _with(params: SamplingParams, **changes: object) -> SamplingParams:
    return msgspec.structs.replace(params, **changes)


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies; with a seed, choice i gets seed + i so that the choices differ yet repeat."""
    if params.seed is None:
        return [params] * n
    return [_with(params, seed=params.seed + i) for i in range(n)]
