"""What every host's base backend session shares: the ``BackendSession`` defaults (a prompt
identity, nothing to switch, the stock model call), the prompt identity encoder, and which
person each line's rows carry. A host's own base session (``SDXLSession``, ``FluxSession``)
adds how its text is encoded (``id_text``, ``scene_text``)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from bf_core.config import BFConfig
from bf_core.protocols import IdentityEncoder
from bf_core.records import Identity, Line, LineConditioning, Person, SemanticPreview


class PromptIdentityEncoder:
    """Identity carried by a prompt: T_id is the ID line's own prompt embedding.

    Used by prompt-trigger methods (DreamBooth, textual inversion, a text description).
    """

    def __init__(self, session: HostSession):
        self.session = session

    def encode(self, person: Person) -> Identity:
        id_prompt = person.id_prompt or self.session.backend.default_id_prompt
        text = self.session.id_text(id_prompt)
        return Identity(id_prompt, tokens=text.prompt_embeds,
                        negative_tokens=text.negative_prompt_embeds)


class LineIdentities:
    """Which person's identity each line's rows carry, for a backend that holds identity
    state per person (image embeds, ID embeddings) rather than in a line's text.

    The semantic (or baseline) line carries the first person's; ID line j person j's, found
    from the rows' ``RowBatch.line_index``. Filled from ``conditioning``, which the loop asks
    for the semantic line first, then for each person's ID line in the people's order.
    """

    def __init__(self) -> None:
        self.semantic: Identity | None = None
        self._people: dict[int, Identity] = {}  # by id(): an Identity is not hashable

    def note(self, line: Line, identity: Identity) -> None:
        """Record that ``line`` was conditioned on ``identity``."""
        if line is Line.ID:
            self._people.setdefault(id(identity), identity)
        else:
            self.semantic = identity

    @property
    def first(self) -> Identity | None:
        """The semantic line's identity, else the first person's."""
        return self.semantic or next(iter(self._people.values()), None)

    def of(self, batch: Any) -> Identity | None:
        """The identity of a one-line batch's rows."""
        people = list(self._people.values())
        if batch.line is Line.ID and 0 < batch.line_index <= len(people):
            return people[batch.line_index - 1]
        return self.first


class HostSession:
    """The ``BackendSession`` defaults; ``id_text(id_prompt)`` and ``scene_text()`` come from
    the host's subclass."""

    def __init__(self, backend: Any, call: Any, config: BFConfig):
        self.backend, self.call, self.config = backend, call, config
        self.pipe, self.request = call.pipe, call.request
        self.encoder: IdentityEncoder = PromptIdentityEncoder(self)
        self._texts: dict[tuple, LineConditioning] = {}
        self.line_identities = LineIdentities()

    def open(self, restore: ExitStack) -> None:
        """Nothing to change on the pipeline."""

    def conditioning(self, line: Line, identity: Identity) -> LineConditioning:
        if line is Line.ID:
            return self.id_text(identity.id_prompt)
        return self.scene_text()

    def negative_shareable(self) -> bool:
        return False

    def supports_row_batching(self, batch: Any) -> bool:
        """False: a backend opts in when it can switch its machinery per row."""
        return False

    def observe_preview(self, preview: SemanticPreview) -> None:
        """Nothing to place."""

    def predict(self, batch: Any, model: Any) -> torch.Tensor:
        return model(batch)
