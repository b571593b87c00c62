# cython: language_level=3
"""Compiled batch-norm loops (float32 / float64, OpenMP). No validation happens here: the Python
layer (bnfold/kernels.py) checks shapes and dtypes and hands over C-contiguous 1-D views.

Every input is seen as (outer, C, inner): outer = prod(shape[:axis]), inner = prod(shape[axis+1:]).
Three loop families:

* "rows" (inner > 1, e.g. NCHW): each (n, c) row is contiguous. Work is split into *units* of at
  most ``BLOCK`` elements of one row; each unit writes its own partial result, and partials are
  merged per channel in a fixed order. The split depends on the shape only, never on the thread
  count, so every thread count gives bit-identical results.
* "slabs" (1 < inner < 256 with >= 8 samples, e.g. 7x7 maps): the reductions keep one partial per
  (chunk of samples, channel) instead of one per short row (statistics: sums shifted by the mean of
  the channel's first row in the chunk), so the partial buffer stays small; element-wise passes
  use the rows loops.
* "cols" (inner == 1, e.g. NHWC and (N, C)): the flat array is cut into *segments* of ``k`` whole
  rows (P = k*C elements, P >= ~960) so the innermost loop is long and vectorises even for C = 3;
  per-position accumulators of length P are folded into channels at the end. Segments are grouped
  into a fixed number of chunks (again independent of the thread count), each chunk producing
  per-channel partials that are merged in order.

Numerics: accumulation is always float64. Statistics never use E[x^2] - E[x]^2 on raw values:
rows use a per-unit two-pass (mean, then centred squares, the unit being in L1), cols use sums
shifted by the chunk's first row. Partials are merged by an exact two-pass over the partials
(equivalent to Chan's formula). Element-wise passes compute (x - m_hi) * s + t where m_hi is the
mean rounded to the input dtype: the subtraction is exact for values near the mean, which keeps
float32 accurate when |mean| >> std (an x*s + t form would lose everything there).
"""

# The code lives in the .pxi so that _bn_kernels_avx2.pyx can compile the same source for AVX2.
include "_bn_kernels_impl.pxi"
