"""DreamBooth's identity encoder when each person has a LoRA of their own."""

from __future__ import annotations

from typing import Any

from bf_core.errors import ConfigError
from bf_core.records import Identity, Person

from .state import OPTION


class PersonPromptEncoder:
    """T_id: a person's ``id_prompt`` through the text encoders with only that person's
    adapters on (``state.text_encoder_switches``).

    The loop encodes the people once each, in the call's order, so the k-th ``encode`` is
    person k and takes the k-th ``person_adapters`` entry.
    """

    def __init__(self, session: Any):
        self.session = session
        self.encoded = 0

    def encode(self, person: Person) -> Identity:
        entries = self.session.person_adapters
        if self.encoded >= len(entries):
            raise ConfigError(f"{OPTION} has {len(entries)} "
                              f"{'entry' if len(entries) == 1 else 'entries'} but the call has "
                              "more people; give one entry per person (None keeps every active "
                              "adapter)")
        adapters = entries[self.encoded]
        self.encoded += 1
        id_prompt = person.id_prompt or self.session.backend.default_id_prompt
        text = self.session.person_text(id_prompt, adapters)
        return Identity(id_prompt, tokens=text.prompt_embeds,
                        negative_tokens=text.negative_prompt_embeds, state={"adapters": adapters})
