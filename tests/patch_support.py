"""Tests of a patch fail on a build that lacks it, unless the stock path was asked for.

``LFM2EDGE_PATCHES=0 make setup test`` builds the stock binding: there the patch tests skip
and the fallback tests run.
"""

from __future__ import annotations

import os

import pytest

STOCK = os.environ.get("LFM2EDGE_PATCHES") == "0"


def require_patch(present: bool, name: str) -> None:
    if present:
        return
    if STOCK:
        pytest.skip(f"stock build (LFM2EDGE_PATCHES=0): no {name} patch")
    pytest.fail(f"this llama.cpp build lacks the {name} patch: rebuild with `make setup`")
