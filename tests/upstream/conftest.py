"""The peers' own test suites, ported: every test here runs once per host backend.

Each module is headed by the upstream repository, path and version it was ported from,
and the list of what was left out and why.  Upstream's expected values and tolerances
are kept as they are; a case that tests a deliberate difference of xentfast is
``xfail(strict=True)`` with the reason README's Semantics table gives.
"""

from __future__ import annotations

import pytest

import xentfast

import helpers


@pytest.fixture(autouse=True, params=helpers.HOST_BACKENDS)
def upstream_backend(request):
    """Every call in the test runs on this backend (``use_backend`` is context-local,
    so a backend named explicitly by a call still wins)."""
    with xentfast.use_backend(request.param):
        yield request.param
