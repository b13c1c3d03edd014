"""The Avro codec as Faust serializers: ``value_serializer="avro:<event type>"``.

Faust clones codecs with their keyword arguments, so the codec instance and the
event type travel as kwargs. Registration is explicit (called when the Faust
app is built), never a side effect of importing this module.
"""

from __future__ import annotations

from typing import Any

from faust.serializers import codecs

from streams.codec import AvroCodec

PREFIX = "avro:"


class FaustAvroCodec(codecs.Codec):
    def __init__(
        self,
        children: tuple[Any, ...] | None = None,
        *,
        avro: AvroCodec,
        event_type: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(children, avro=avro, event_type=event_type, **kwargs)
        self._avro = avro
        self._event_type = event_type

    def _dumps(self, obj: Any) -> bytes:
        return self._avro.encode(self._event_type, obj)

    def _loads(self, s: bytes) -> Any:
        return self._avro.decode(s, expected=self._event_type).record


def register_faust_codecs(avro: AvroCodec) -> list[str]:
    """Register ``avro:<event type>`` for every current schema; return the names."""
    names = []
    for event_type in avro.registry.event_types:
        name = PREFIX + event_type
        codecs.register(name, FaustAvroCodec(avro=avro, event_type=event_type))
        names.append(name)
    return names
