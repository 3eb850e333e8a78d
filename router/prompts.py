"""From request messages or prompts to token ids (runs in a thread: templates and long prompts take time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from router.errors import APIError
from router.openai_api import ChatCompletionRequest, ChatMessage, Prompt
from router.tools import ToolPlan, builtin_tool_template, plan_tools, uses_tool_messages

if TYPE_CHECKING:
    from mixquant_serve.tokenizer import Tokenizer

_RESERVED_TEMPLATE_KWARGS = ("chat_template", "messages", "tools", "add_generation_prompt")


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    text: str  # the rendered prompt, a forced tool-call start included
    messages: list[dict[str, Any]]
    tools: ToolPlan


def encode_chat(tok: Tokenizer, req: ChatCompletionRequest, template_overridden: bool = False,
                tool_constraint: str = "all") -> ChatPrompt:
    """Render the messages (and tools) with the chat template and tokenize them.

    Tools use the model's template when it has a tools section, our ChatML tool template otherwise
    (also for conversations that carry tool calls or results); --chat-template always wins.
    """
    if not tok.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions or start the router "
                            "with --chat-template", code="no_chat_template")
    messages = [_message_dict(m) for m in req.messages]
    plan = plan_tools(req, tool_constraint)
    template = None
    wants_tools = plan.tools is not None or uses_tool_messages(messages)
    if wants_tools and not template_overridden and not tok.template_supports_tools:
        template = builtin_tool_template()
    kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
    try:
        text = tok.apply_chat_template(messages, tools=plan.tools, chat_template=template,
                                       add_generation_prompt=req.add_generation_prompt, **kwargs)
    except APIError:
        raise
    except Exception as e:  # a template may raise anything (jinja's raise_exception included)
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
    text += plan.forced
    return ChatPrompt(tok.encode(text, add_special_tokens=False), text, messages, plan)


def _message_dict(msg: ChatMessage) -> dict[str, Any]:
    out = msg.model_dump(exclude_none=True)
    if isinstance(msg.content, list):
        parts = []
        for part in msg.content:
            if part.type != "text" or part.text is None:
                raise APIError(400, f"content parts of type {part.type!r} are not supported; only text",
                               param="messages")
            parts.append(part.text)
        out["content"] = "".join(parts)
    return out


def encode_prompts(tok: Tokenizer, prompt: Prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [_nonempty(tok.encode(prompt))]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], str):
        return [_nonempty(tok.encode(p)) for p in prompt]
    lists = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
    if any(not ids or min(ids) < 0 for ids in lists):
        raise APIError(400, "prompt holds an empty or negative token list", param="prompt")
    if (top := max(max(ids) for ids in lists)) >= tok.vocab_size:
        raise APIError(400, f"prompt token id {top} is outside the vocabulary (size {tok.vocab_size})",
                       param="prompt")
    return lists


def prompt_text(tok: Tokenizer, prompt: Prompt, index: int, ids: list[int]) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[index]
    return tok.decode(ids)


def _nonempty(ids: list[int]) -> list[int]:
    if not ids:
        raise APIError(400, "the prompt encodes to no tokens", param="prompt")
    return ids
