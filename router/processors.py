"""The output processor chain of one chat choice, from what the request and the model call for."""

from __future__ import annotations

from router.postprocess import OutputProcessor, PlainText
from router.prompts import ChatPrompt
from router.reasoning import ThinkSplitter, prompt_opens_thinking
from router.tool_parser import ToolCallParser


def create_processor(prompt: ChatPrompt, reasoning: bool) -> OutputProcessor:
    """[ThinkSplitter ->] [ToolCallParser ->] PlainText. A forced tool call leaves no room to think."""
    proc: OutputProcessor = PlainText()
    plan = prompt.tools
    if plan.parse:
        proc = ToolCallParser(proc, primed=plan.forced, parallel=plan.parallel)
    if reasoning and not plan.forced:
        proc = ThinkSplitter(proc, open_in_prompt=prompt_opens_thinking(prompt.text))
    return proc
