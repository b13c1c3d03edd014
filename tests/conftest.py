"""Fixtures shared by every tier."""

from __future__ import annotations

import pytest

from kernel.settings import PROJECT_ROOT
from streams.codec import AvroCodec, load_codec


@pytest.fixture(scope="session")
def codec() -> AvroCodec:
    return load_codec(PROJECT_ROOT / "schemas" / "avro")
