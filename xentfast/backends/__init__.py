"""The backends of xentfast and the kernel contract they share.

Every backend module (``numpy_ref``, ``numba_cpu``, ``cython_shim``, ``numba_cuda``)
exposes the same destination-passing kernel set.  The public layer (``xentfast._api``)
validates, moves the class axis last, flattens leading dimensions, allocates every
output and performs the final reductions; a kernel only fills the arrays it is given.

Arrays handed to a kernel
-------------------------
``logits``   (n, c) C-contiguous, ``c >= 1``, ``n >= 1``; float32 or float64, plus
             float16 where the backend lists it in ``NATIVE_DTYPES`` (the public layer
             upcasts 16-bit input to float32 for the others and rounds results back).
``labels``   sparse: (n,) int64, every value in ``[0, c)`` or equal to
             ``ignore_index`` (host backends may rely on it: the public layer checked);
             dense: (n, c) probabilities, same dtype as ``logits``.
``weight``   (c,) class weights in the accumulation dtype, or shape (0,) for none.
``loss``     (n,) out, accumulation dtype: the per-row loss, 0 for ignored rows.
``lse``      (n,) out, accumulation dtype: the per-row log-sum-exp (ignored rows too).
``grad``     (n, c) out in the logits' dtype, or ``None`` for a loss-only call.  It may
             be the very same array as ``logits`` (``inplace=True``): a kernel must read
             everything it needs from a row before it overwrites that row, element by
             element, in its last pass.

The accumulation dtype is float64 for float64 logits and float32 otherwise.

Scalars: ``ignore_index`` (int), ``label_smoothing`` eps in [0, 1], ``z_loss`` z >= 0,
``grad_scale`` s (the reduction's factor: 1 for "sum"/"none", 1/denominator for
"mean"; the public layer computes it before the kernel runs).

Kernels
-------
``sparse(logits, labels, weight, ignore_index, label_smoothing, z_loss, grad_scale,
loss, lse, grad)`` -- index labels.
``dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad)``
-- probability labels.
``logsumexp(x, out)`` -- out (n,) accumulation dtype.
``log_softmax(x, out)``, ``softmax(x, out)`` -- out (n, c) in x's dtype.

The mathematics (one row, x = logits row, C classes)
----------------------------------------------------
1. m = max_j x_j;  s = sum_j exp(x_j - m);  lse = m + log(s).
   Shifting by m makes every exponent <= 0, so exp never overflows and the largest
   term is exactly 1, so s >= 1 and log(s) never underflows: lse is exact to rounding
   for any finite x (even +-1e30).  p_j = exp(x_j - m) / s = exp(x_j - lse).
   An all -inf row gives m = -inf, x - m = NaN: the row is NaN, by design.
2. Index label y with class weights w (w = 1 without weights), smoothing eps:
   loss = (1 - eps) w_y (lse - x_y) + (eps / C) sum_c w_c (lse - x_c) + z lse^2
        = (1 - eps) w_y (lse - x_y) + (eps / C) (W lse - sum_c w_c x_c) + z lse^2,
   W = sum_c w_c.  This is torch.nn.functional.cross_entropy's per-row loss.
   d lse / d x_j = p_j, so
   d loss / d x_j = p_j [(1 - eps) w_y + eps W / C + 2 z lse]
                    - (1 - eps) w_y [j == y] - (eps / C) w_j.
   The true-class term p_y - 1 is formed in the accumulation dtype, then scaled by s
   and rounded once to the output dtype.  Ignored rows: loss 0, grad 0.
3. Probability labels t, smoothed t'_c = (1 - eps) t_c + eps / C:
   loss = sum_c w_c t'_c (lse - x_c) + z lse^2
   d loss / d x_j = p_j [sum_c w_c t'_c + 2 z lse] - w_j t'_j.
   With sum_c t_c = 1 and no weights this is TensorFlow's backprop p - t.
   A class with t'_c = 0 contributes nothing, also where x_c = -inf (a masked logit
   is not 0 * inf = NaN).
4. The gradient is multiplied by grad_scale; the loss is not (the public layer
   reduces the per-row losses in float64).
"""
