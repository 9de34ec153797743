"""Turning a request's chat into the model's token ids on some node, robustly.

Any node with the model renders (its tokenizer and chat template are the same
everywhere); one that stops answering is left for another. Renders are memoized, so a
conversation's count_tokens and its request, or a client's retry, are tokenized once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from coordinator.nodes import NodeRegistry, NodeView
from coordinator.watchdog import RENDER_SECONDS, watched
from mesh.errors import Unavailable
from mesh.types import ChatPrompt, RenderedPrompt

log = logging.getLogger(__name__)

T = TypeVar("T")

# Renders remembered.
RENDER_MEMO = 256


def another_node(registry: NodeRegistry, model: str, exclude: set[str]) -> NodeView | None:
    """An online node for `model` not in `exclude` (targets): loaded there first, then the
    least loaded."""
    views = [v for v in registry.served_models().get(model, []) if v.target not in exclude]
    if not views:
        return None

    def key(v: NodeView) -> tuple[int, int]:
        info = v.model(model)
        return (0 if info is not None and info.loaded else 1, v.load)

    return min(views, key=key)


class PromptRenderer:
    """Renders and tokenizes on the mesh's nodes (one per coordinator)."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self._renders: OrderedDict[tuple[str, str], RenderedPrompt] = OrderedDict()

    async def render(self, view: NodeView, model: str, chat: ChatPrompt) -> RenderedPrompt:
        """`chat` rendered by `view` (or remembered from an earlier identical render)."""
        key = (model, repr(chat))
        hit = self._renders.get(key)
        if hit is not None:
            self._renders.move_to_end(key)
            return hit
        rendered = await view.client.render(model, chat)
        self._renders[key] = rendered
        while len(self._renders) > RENDER_MEMO:
            self._renders.popitem(last=False)
        return rendered

    async def on_a_node(
        self,
        first: NodeView,
        model: str,
        call: Callable[[NodeView], Awaitable[T]],
        what: str,
    ) -> tuple[T, NodeView]:
        """`call(first)` under the watchdog, then on other nodes with `model` while a
        node stops answering (the result, and the node that gave it)."""
        view, tried = first, set[str]()
        while True:
            tried.add(view.target)
            try:
                got = await watched(
                    view, self.registry.stale_after, call(view), deadline=RENDER_SECONDS, what=what
                )
                return got, view
            except Unavailable as err:
                other = another_node(self.registry, model, tried)
                if other is None:
                    raise
                log.warning(
                    "%s on %s failed (%s); trying %s", what, view.node_id, err, other.node_id
                )
                view = other
