"""Tests of a patch fail on a build that lacks it, unless the stock path was asked for.

Which patches a build carries is what patches/build.py recorded in the wheel (``lfm2edge info``,
``build_info().patches``); the tests then check the patch's behaviour, never its source text.
``LFM2EDGE_PATCHES=0 make setup test`` builds the stock binding: there the patch tests skip
and the fallback tests run.
"""

from __future__ import annotations

import os

import pytest

from lfm2edge.runtime.core.build import build_info

STOCK = os.environ.get("LFM2EDGE_PATCHES") == "0"


def require_patch(name: str) -> None:
    """Return when the build carries the patch ``name`` (a part of its file name), skip on a stock build,
    fail otherwise."""
    if build_info().has_patch(name):
        return
    if STOCK:
        pytest.skip(f"stock build (LFM2EDGE_PATCHES=0): no {name} patch")
    pytest.fail(f"this llama.cpp build lacks the {name} patch: rebuild with `make setup`")
