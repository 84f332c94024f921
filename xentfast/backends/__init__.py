"""The backends of xentfast and the kernel contract they share.

Every backend module (``numpy_ref``, ``numba_cpu``, ``cython_shim``, ``numba_cuda``)
exposes the same destination-passing kernel set.  The public layer (``xentfast._api``)
validates, moves the class axis last, flattens leading dimensions, allocates every
output and performs the final reductions; a kernel only fills the arrays it is given.

Arrays handed to a kernel
-------------------------
``logits``   (n, c) C-contiguous, ``c >= 1``, ``n >= 1``; float32 or float64, plus
             float16 where the backend lists it in ``NATIVE_DTYPES`` (cuda), and for
             ``sparse``/``dense`` the 16-bit formats named in ``NATIVE_HALF`` (cpu,
             cython: ``("float16", "bfloat16")``), given as float16 arrays, arrays whose
             dtype is named "bfloat16" (ml_dtypes), or uint16 bits with the keyword
             ``half="float16"``/``"bfloat16"`` (PyTorch memory, no NumPy type needed).
             16-bit logits are widened to float32 as they are loaded and the gradient
             is rounded once, to nearest even, into the logits' format: the float32
             kernel's result on the widened logits, rounded once, bit for bit.  For
             every other case the public layer upcasts 16-bit input to float32 and
             rounds the results back.
``labels``   sparse: (n,) int64, every value in ``[0, c)`` or equal to
             ``ignore_index`` (host backends may rely on it: the public layer checked);
             dense: (n, c) probabilities, same dtype (or 16-bit format) as ``logits``.
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
loss, lse, grad[, *, half])`` -- index labels.
``dense(logits, labels, weight, label_smoothing, z_loss, grad_scale, loss, lse, grad[,
*, half])`` -- probability labels.  (``half`` only on backends with ``NATIVE_HALF``.)
``logsumexp(x, out)`` -- out (n,) accumulation dtype.
``log_softmax(x, out)``, ``softmax(x, out)`` -- out (n, c) in x's dtype.

The mathematics (one row, x = logits row, C classes)
----------------------------------------------------
Written once, in ``rowmath`` (plain arithmetic that NumPy vectorises, Numba compiles
for the CPU and CUDA, and the C kernels mirror under the same names); its docstring
has the derivations.  In short:

1. Row passes: m = max_j x_j;  e_j = exp(x_j - m);  u = sum of e_j off the max,
   t = number of ties at it;  r = u + (t - 1), the mass of every class but one
   maximum (s = sum_j e_j = 1 + r);  log s = log1p(r);  lse = m + log s.
   Shifting by m keeps every exponent <= 0 and the largest term exactly 1, so lse is
   exact to rounding for any finite x (even +-1e30).  An all -inf row, a +inf or a NaN
   makes the row NaN.
2. Index label y, class weights w (ones without), smoothing eps, z-loss z -- PyTorch's
   per-row loss plus z lse^2:
   loss = (1 - eps) w_y ((m - x_y) + log s) + (eps/C) (W log s + wd) + z lse^2,
   W = sum_c w_c, wd = sum_{w_c != 0} w_c (m - x_c).
   g_j = e_j a - b_j (j != y), a = [(1 - eps) w_y + eps W/C + 2 z lse] gs / s,
   b_j = (eps/C) w_j gs;  g_y = gs (p_y (eps W/C + 2 z lse)
                                    - ((1 - eps) w_y ((1 - e_y) + r)/s + (eps/C) w_y)).
   Ignored rows: loss 0, grad 0 (lse still computed).
3. Probability labels t, wt_c = w_c ((1 - eps) t_c + eps/C), T = sum_c wt_c:
   loss = T log s + sum_{wt_c != 0} wt_c (m - x_c) + z lse^2;
   g_j = ((e_j A - wt_j) - wt_j r) gs / s, A = T + 2 z lse.
   (With sum_c t_c = 1 and no weights this is TensorFlow's backprop p - t.)
4. log_softmax_j = (x_j - m) - log s;  softmax_j = e_j / s.
5. The gradient is multiplied by grad_scale; the loss is not (the public layer
   reduces the per-row losses in float64).
6. Soft-capping (``softcap=c``, Gemma 2) happens around the kernels, in the public
   layer's array operations: the kernels see z' = c tanh(z / c), and the gradient of
   the row loss L(z') with respect to z is dL/dz' * dz'/dz with
   dz'/dz = 1 - tanh^2(z / c) = 1 / cosh^2(z / c) = 4a / (1 + a)^2, a = exp(-2 |z / c|)
   -- never 1 - tanh^2, which cancels to 0 (or 100% error) where |tanh| rounds to 1.

Why these forms (the precision rule)
------------------------------------
Every subtraction in them is of quantities of one sign, or a genuine zero crossing of
the exact result.  The forms they replace lose the confident rows training spends its
time in: lse - x_y after rounding lse (a loss of 2.6e-5 came out as 0), log(s) of
s = 1 + r (r rounded away), p_y - 1 (the true-class gradient of a confident float64
row came out as 0), W lse - sum w x under label smoothing (-1.4e11 for a loss of 6.2).
``p_y - 1 = -(sum_{j != y} e_j) / s = -((1 - e_y) + r) / s`` holds exactly.
No compiler may reassociate them: the Numba backends compile rowmath without fastmath
flags (``reassoc`` only inside the SIMD reductions), and the C build never uses
-ffast-math.  Every e_j, in every sum, gradient and softmax of every backend, is
compensated for the rounding of x_j - m (alone up to |x_j - m| / 2 ulps of e_j, which a
confident row's loss log1p(r) inherited: 41 ulps for the float32 row [72.164894,
4.7841673]); accumulation is in the logits' dtype within blocks of a row and in float64
across blocks.  The measured bounds are in BENCHMARKS.md.

Class chunks (vocabulary-parallel, class-chunked Dask arrays)
-------------------------------------------------------------
When no kernel sees a whole row, ``xentfast._shards`` takes per-chunk row statistics
and merges them exactly; its docstring has the derivation.  In short, chunk k gives
m_k (its max), u_k (the mass below it), t_k (the ties at it), the target logit where
it owns the label, and the smoothing sums A_k = sum a_c and D_k = sum a_c (m_k - x_c);
the merge is M = max m_k, t = sum of t_k at M, u = sum of u_k at M + sum of
(t_k + u_k) e^(m_k - M) below it, D = sum [A_k (M - m_k) + D_k] -- all terms >= 0, an
all -inf chunk being (m, s) = (-inf, 0) -- and then r = u + (t - 1) and the forms of
step 2 with the GLOBAL C, W and D.  The backends ``numpy`` and ``cpu`` provide the
statistics as one more kernel (the others fall back to them):
``row_stats(x, coef, probs, one_m_eps, eps_c, m, u, t, coef_sum, dist)`` -- m (n,) in
x's dtype, u and t (n,) float64, the row passes A and B; with ``coef`` (c,) non-empty
also coef_sum = sum_j a_j and dist = sum_{a_j != 0} a_j (m - x_j) (float64), a_j =
coef_j, or coef_j ((1 - eps) t_j + eps_c) with probability rows ``probs`` (n, c).
Rows without a finite maximum get NaN sums; the caller gives them their meaning.
The ``cpu`` backend also computes a chunk's gradient columns from the merged row totals
in one compiled pass, ``shard_grad_rows`` (the arguments of ``_shards.grad_rows``: e_j =
exp(x_j - M) from the exact difference, rowmath's gradient forms, float64 per element,
rounded once); elsewhere ``_shards.grad_rows_numpy`` computes the same in NumPy.
"""
