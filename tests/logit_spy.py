"""A test helper that records the logits an engine samples from."""

from __future__ import annotations

from mixquant_serve import Engine


class LogitSpy:
    """Wraps the engine's sampler and keeps every logits row it samples from, per request."""

    def __init__(self, engine: Engine) -> None:
        self.inner, self.rows = engine.sampler, {}
        engine.sampler = self

    def __getattr__(self, name):  # the sampler's other entry points (sample_on_device) pass through unrecorded
        return getattr(self.inner, name)

    def __call__(self, logits, reqs):
        for row, req in zip(logits, reqs, strict=True):
            self.rows.setdefault(req.rid, []).append(row.detach().clone())
        return self.inner(logits, reqs)
