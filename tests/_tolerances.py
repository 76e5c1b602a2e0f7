"""Tolerances for comparing two float computations of the same result that are not
the same program: jit and eager, fused and plain, ours and a peer's (keras, flax,
PyTorch, NumPy).

Such programs round differently: a compiler may sum in another order, split a dot
product across vector lanes of another width (AVX2 against AVX-512), or contract a
multiply and an add into one FMA. None of that is a bug, and none of it is the same
from one x86 CPU to the next, so they are never compared bitwise. Bitwise equality is
kept for the same program run twice (tied tables, a resumed run, a pass-through).

The bound: a sum of `n` terms accumulated in any order is within
`gamma(n) * sum(|terms|)` of the exact sum, `gamma(n) = n*u / (1 - n*u)` with the unit
roundoff `u = eps / 2` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd
ed., sections 3.1 and 4.2). Two programs that each meet it differ by at most
`2 * gamma(n) * sum(|terms|)`, about `n * eps * sum(|terms|)`. This is the worst case,
whatever the order: the typical error grows as `sqrt(n) * eps`, but a test has to hold
on every machine, so it gets the worst case.
"""

import numpy as np


def tolerance(dtype, reduction: int = 1, *, scale: float = 1.0) -> dict[str, float]:
    """`rtol` and `atol` for `np.testing.assert_allclose(ours, theirs, **tolerance())`
    when `ours` and `theirs` compute the same values in `dtype` by different programs.

    **Arguments:**

    - `dtype`: the dtype both were computed in (for a mixed pair, the less precise).
    - `reduction`: `n`, the longest chain of roundings behind one output: the length
        of its dot products and sums, plus a few for each elementwise function
        (`exp`, `tanh`, `rsqrt` differ by an ulp or two between libraries), summed
        over the layers it goes through.
    - `scale`: a bound on `sum(|terms|)` behind one output (say the largest entry of
        `abs(a) @ abs(b)`): results that cancel to near zero keep the absolute error
        of their terms, which no relative tolerance covers.

    **Returns:**

    `dict(rtol=n * eps, atol=n * eps * scale)`, with `eps` the dtype's machine epsilon.
    """
    bound = reduction * float(np.finfo(dtype).eps)
    return dict(rtol=bound, atol=bound * scale)


def matmul_tolerance(left, right, dtype=np.float32, *, after: int = 0):
    """`tolerance` for `left @ right.T` (and what follows it) by two programs.

    **Arguments:**

    - `left`, `right`: the operands, of shapes `(..., width)` and `(rows, width)`.
    - `dtype`: the dtype the products are accumulated in.
    - `after`: the roundings that follow the product (a soft cap's divide, tanh and
        multiply: say 4).

    **Returns:**

    `tolerance(dtype, width + after, scale=max(|left| @ |right|.T))`.
    """
    left = np.abs(np.asarray(left, np.float64))
    right = np.abs(np.asarray(right, np.float64))
    scale = float((left @ right.T).max(initial=0.0))
    return tolerance(dtype, right.shape[-1] + after, scale=scale)
