"""Second derivatives of the fused loss from its saved gradient alone, written once for
the framework adapters that keep that gradient (``xentfast.torch``, ``xentfast.keras``
on TensorFlow; ``xentfast.jax`` differentiates a jnp composite instead).

Per row (class axis last), with p the softmax, b the target weights times the
reduction's scale (``(1 - eps) w_y [c == y] + eps/C w_c`` on kept rows for class ids,
``w_c ((1 - eps) t_c + eps/C)`` for probabilities) and z' = z times that scale, the
gradient the kernels return is

    g = K p - b,        K = sum_c b_c + 2 z' lse

(rowmath.py's gradient, written per row).  Since sum_c p_c = 1, sum_c (g_c + b_c) = K, so
p = (g + b) / K, and the Hessian of the row's loss is

    H = K (diag p - p p^T) + 2 z' p p^T

(the softmax Jacobian scaled by the row's weight mass plus its z-loss term, and the
z-loss's own 2 z' p p^T), so H v = K (p v - p (p . v)) + 2 z' p (p . v): no logits kept.
Rows with K = 0 and no z-loss (zero weight mass, or ignored) have g = 0 and H = 0.  With
a z-loss, K = 0 where lse = -sum(b) / (2 z') -- logits near -1/(2 z) and below -- and p
cannot be read from g = -b: those rows get NaN, never a silent 0; near it p loses the
digits that cancel in g + b.
"""

from __future__ import annotations


def softmax_from_grad(g, b, z2, row_sum, where):
    """(p, K) of each row (class axis last) from its gradient ``g = K p - b``.

    ``b``: the target weights (as ``g``); ``z2``: 2 z' per row with the class axis kept
    (size 1), or 0 without a z-loss; ``row_sum(a)``: the sum over the class axis, kept as
    size 1; ``where(cond, a, b)``: a select that takes Python numbers for ``a``/``b``
    (constants: no NaN enters a derivative through an unselected branch).  Arithmetic
    only otherwise, so the result is differentiable in ``g`` by the framework (a third
    derivative goes through it)."""
    gb = g + b
    k = row_sum(gb)
    unknowable = (k == 0) & (k * 0 + z2 != 0)  # K = 0 by the z-loss: p is not in g
    p = where(k == 0, where(unknowable, float("nan"), 0.0), gb / where(k == 0, 1.0, k))
    return p, k


def hessian_vector_product(g, b, v, z2, row_sum, where):
    """H v for rows of softmax cross-entropy (class axis last) from their gradient ``g``
    (arguments as :func:`softmax_from_grad`; ``v`` as ``g``)."""
    p, k = softmax_from_grad(g, b, z2, row_sum, where)
    pv = row_sum(p * v)
    return k * (p * v - p * pv) + z2 * p * pv
