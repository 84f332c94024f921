"""The README's Python examples run, and print what their comments say.

Each ```python block of README.md is executed on its own, in a fresh namespace, as a
reader pasting it into a new interpreter would (illustrative snippets that would change
global state, such as set_backend, are fenced ```py).  A line of
the form ``print(EXPR)  # NUMBERS`` is also checked: EXPR is evaluated and compared
with the numbers in the comment (to the digits the comment shows), or with a comment
``True`` / ``False``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
_PRINT_WITH_VALUE = re.compile(
    r"^print\((?P<expr>.*)\)\s*#\s*(?P<value>True|False|[-\d\[\]\s.e]+?)(\.\.\.)?\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _blocks() -> list[str]:
    return _BLOCK.findall(README.read_text())


def _checked_prints(block: str):
    for line in block.splitlines():
        match = _PRINT_WITH_VALUE.match(line.strip())
        if match:
            yield match["expr"], match["value"]


def test_readme_has_examples():
    blocks = _blocks()
    assert len(blocks) >= 2
    assert sum(1 for b in blocks for _ in _checked_prints(b)) >= 4


def test_readme_examples_run_and_print_what_they_say(capsys):
    checked = 0
    for block in _blocks():
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        for expr, value in _checked_prints(block):
            if value in ("True", "False"):
                got_bool = eval(expr, namespace)
                assert isinstance(got_bool, (bool, np.bool_)), (expr, got_bool)
                assert bool(got_bool) == (value == "True"), f"README: print({expr})"
                checked += 1
                continue
            got = np.asarray(eval(expr, namespace), dtype=np.float64).ravel()
            numbers = _NUMBER.findall(value)
            expected = np.array([float(n) for n in numbers])
            assert got.size == expected.size, (expr, got, value)
            # The comment shows a rounded value: compare to its last shown digit.
            decimals = min(len(n.split(".")[1]) if "." in n else 0 for n in numbers)
            np.testing.assert_allclose(got, expected, atol=1.01 * 10.0 ** -decimals, rtol=0,
                                       err_msg=f"README: print({expr})")
            checked += 1
    capsys.readouterr()
    assert checked >= 4


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__]))
