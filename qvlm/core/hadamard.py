"""Hadamard matrices of the sizes real models use, randomised, and the fast Walsh-Hadamard transform (the torch
reference of an online rotation).

    hadamard_matrix(n)          (n, n) entries +-1, H H^T = n I; n = 2^k, or a product of Paley orders and 2^k
    random_hadamard(n, seed)    H diag(s) / sqrt(n) with random signs s: orthogonal, seeded (QuaRot's rotation)
    fwht(x)                     x @ H_n / sqrt(n) along the last dim, one small matmul per Kronecker factor
    kernel_base(n)              the (m, m) non-power-of-two factor of H_n (None if n = 2^k): what the Triton
                                kernel `kernels.hadamard` takes beside x (it applies H_n = base (x) H_{n/m})

Sizes that are not a power of two (SmolLM2's hidden 576 = 12 x 12 x 4, its MLP 1536 = 12 x 128) use the Kronecker
product of Hadamard matrices, which is again a Hadamard matrix: H_{ab} = H_a (x) H_b. The non-power-of-two factors
come from Paley's first construction: for a prime q = 3 (mod 4), the order-(q + 1) matrix built from the quadratic
residues mod q (12 from q = 11, 20 from 19, 24 from 23, 44 from 43, ...).

References: QuaRot (Ashkboos et al. 2024) `hadamard_utils.py` (get_hadK: Kronecker of a stored H_12 / H_20 / ... and
a power-of-two FWHT); Paley, "On orthogonal matrices" (1933).
"""
from __future__ import annotations

import functools
import math

import torch

from ..errors import QVLMError

INPUT_TRANSFORMS = (None, "hadamard")          # online input rotations a layer may run (QuantLinear.input_transform)
_PALEY_PRIMES = (3, 7, 11, 19, 23, 31, 43, 47, 59, 67, 71, 79, 83)   # q = 3 mod 4: orders q + 1


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _paley(q: int) -> torch.Tensor:
    """Paley I: order q + 1 from the quadratic character chi mod a prime q = 3 (mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = lambda a: 0 if a % q == 0 else (1 if a % q in residues else -1)        # noqa: E731
    s = torch.tensor([[chi(j - i) for j in range(q)] for i in range(q)], dtype=torch.float64)   # skew: S^T = -S
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, -1, s
    return c + torch.eye(q + 1, dtype=torch.float64)                              # I + C, C skew conference


@functools.lru_cache(maxsize=None)
def factors(n: int) -> tuple[int, ...]:
    """(m_1, ..., 2^k): Paley orders and a power of two whose product is n, or () if none is known."""
    if _is_pow2(n):
        return (n,)
    for q in _PALEY_PRIMES:
        m = q + 1
        if n % m == 0 and not _is_pow2(m):
            rest = factors(n // m)
            if rest:
                return (m,) + rest
    return ()


@functools.lru_cache(maxsize=None)
def _base(m: int) -> torch.Tensor:
    return _sylvester(m) if _is_pow2(m) else _paley(m - 1)


def hadamard_matrix(n: int) -> torch.Tensor:
    """(n, n) float64 Hadamard matrix (entries +-1, H H^T = n I) via Kronecker products (module docstring)."""
    fs = factors(n)
    if not fs:
        raise QVLMError(f"no Hadamard matrix of order {n} is known here (not 2^k times a Paley order)",
                        "rotate with an orthogonal matrix instead (--transform rotate with kind='orthogonal')")
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in fs:
        h = torch.kron(h, _base(m))
    return h


@functools.lru_cache(maxsize=None)
def _kernel_base(n: int, device: str) -> torch.Tensor | None:
    fs = factors(n)
    if not fs:
        hadamard_matrix(n)                                  # raises the one-line error
    base = torch.ones(1, 1, dtype=torch.float64)
    for m in fs[:-1]:                                       # factors() puts the power of two last
        base = torch.kron(base, _base(m))
    return None if base.shape[0] == 1 else base.to(device=device, dtype=torch.float32)


def kernel_base(n: int, device="cpu") -> torch.Tensor | None:
    """(m, m) fp32 +-1 matrix with H_n = kron(base, H_{n/m}) and n/m a power of two (None when n = 2^k)."""
    return _kernel_base(int(n), str(device))


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """diag(s) H / sqrt(n) with random signs s (seeded): orthogonal, every entry +-1/sqrt(n) (QuaRot)."""
    return random_signs(n, seed)[:, None] * hadamard_matrix(n) / math.sqrt(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), seeded: for any n."""
    g = torch.Generator().manual_seed(int(seed))
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ hadamard_matrix(n) / sqrt(n) along the last dim (n = x.shape[-1]): one small matmul per Kronecker factor
    (H_n = H_a (x) H_b (x) ..., a power of two above FACTOR_MAX cut into balanced Sylvester factors), O(n * sum of
    factors) per row. On a CPU this beats log2(n) butterfly stages of adds (measured fwd + bwd on 1600 rows, 2 cores:
    2-3.5x faster for n = 64..384 and 1536, equal for 576). Same dtype as x."""
    n = x.shape[-1]
    fs = factors(n)
    if not fs:
        hadamard_matrix(n)                                  # raises the one-line error
    fs = _split(fs)
    lead = x.shape[:-1]
    y = x.reshape(-1, *fs)                                  # index (i_1, ..., i_k): row-major = Kronecker order
    for axis, m in enumerate(fs, start=1):
        y = torch.movedim(torch.movedim(y, axis, -1) @ _factor(m, y.dtype, str(y.device)), -1, axis)
    return (y / math.sqrt(n)).reshape(*lead, n)


FACTOR_MAX = 256                                            # largest Sylvester factor fwht multiplies densely


@functools.lru_cache(maxsize=None)
def _split(fs: tuple[int, ...]) -> tuple[int, ...]:
    """factors() with a power of two (last) above FACTOR_MAX cut into balanced Sylvester factors (H_{2^k} = H_{2^a}
    (x) H_{2^(k-a)}, exact since both are Kronecker powers of H_2), recursively."""
    *rest, last = fs
    if not _is_pow2(last) or last <= FACTOR_MAX:
        return fs
    a = 2 ** (last.bit_length() // 2)                      # last = 2^k: a = 2^ceil(k / 2)
    return (*rest, *_split((a,)), *_split((last // a,)))


@functools.lru_cache(maxsize=None)
def _factor(m: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return _base(m).to(device=device, dtype=dtype)


def rotate_input(x: torch.Tensor, input_transform: str | None) -> torch.Tensor:
    """A layer's online input rotation: fwht(x) for "hadamard", else x unchanged (what the layer's weight multiplies;
    taps that record a layer's input apply it, e.g. qvlm.core.hooks.InputTap)."""
    return fwht(x) if input_transform == "hadamard" else x
