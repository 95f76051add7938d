"""Hadamard matrices of the orders LLM widths need, by construction: Sylvester doubling times a Paley
matrix (Paley I: order q+1 for a prime power q = 3 mod 4; Paley II: order 2(q+1) for q = 1 mod 4), so
576 = 16·36 (Paley II, q=17) and 1536 = 128·12 (Paley I, q=11). Also the random orthogonal matrices
QuaRot rotates the residual stream with, and the online Hadamard a linear applies to its input
(`attach`: a forward pre-hook, so every observer of the input sees what the weight multiplies)."""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
from typing import Optional

import numpy as np
import torch
from torch import nn

MAX_FACTOR = 64  # Sylvester factors applied as matmuls of at most this order


def _prime_power(q: int) -> Optional[tuple[int, int]]:
    """(p, k) with q = p**k, p prime; None otherwise."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mul(a: tuple, b: tuple, modulus: tuple, p: int) -> tuple:
    """Product of two elements of GF(p^k) (coefficient tuples, lowest first) modulo a monic polynomial."""
    k = len(modulus) - 1
    prod = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] = (prod[i + j] + x * y) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce x^d with x^k = -(modulus[:k])
        c = prod[d]
        if c:
            for i in range(k + 1):
                prod[d - k + i] = (prod[d - k + i] - c * modulus[i]) % p
    return tuple(prod[:k])


def _quadratic_character(q: int) -> tuple[list[tuple], dict[tuple, int]]:
    """The elements of GF(q) (as coefficient tuples) and the quadratic character of each."""
    p, k = _prime_power(q)
    elements = list(itertools.product(range(p), repeat=k))
    zero = tuple([0] * k)
    if k == 1:
        squares = {((a * a) % p,) for a in range(1, p)}
    else:
        # a monic irreducible modulus: one whose quotient ring has no zero divisors
        for tail in itertools.product(range(p), repeat=k):
            modulus = tail + (1,)
            if tail[0] and all(_poly_mul(a, b, modulus, p) != zero
                               for a in elements if a != zero for b in elements if b != zero):
                break
        squares = {_poly_mul(a, a, modulus, p) for a in elements if a != zero}
    return elements, {e: 0 if e == zero else (1 if e in squares else -1) for e in elements}


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(e_i - e_j) over GF(q)."""
    elements, chi = _quadratic_character(q)
    p, _ = _prime_power(q)
    return np.array([[chi[tuple((x - y) % p for x, y in zip(a, b))] for b in elements] for a in elements])


def _paley(m: int) -> Optional[np.ndarray]:
    """A Hadamard matrix of order m by Paley I or II, or None when neither applies."""
    q = m - 1
    if _prime_power(q) and q % 4 == 3:  # Paley I: I + S, S = [[0, 1ᵀ], [-1, Q]] skew-symmetric
        s = np.zeros((m, m), dtype=np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return np.eye(m, dtype=np.int64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _prime_power(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix
        c = np.zeros((m // 2, m // 2), dtype=np.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(m // 2, dtype=np.int64),
                                                                 np.array([[1, -1], [-1, -1]]))
    return None


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


@functools.lru_cache(maxsize=None)
def _factors(n: int) -> tuple[np.ndarray, ...]:
    """±1 matrices whose Kronecker product is a Hadamard matrix of order n (Sylvester factors of at most
    MAX_FACTOR, then the Paley base), the base as small as possible."""
    if n < 1:
        raise ValueError(f"no Hadamard matrix of order {n}")
    k = (n & -n).bit_length() - 1  # the power of two in n
    for j in range(k, -1, -1):
        m = n >> j
        base = _sylvester(m) if m in (1, 2) else _paley(m)
        if base is None:
            continue
        pow2 = 1 << j if m > 2 else n
        out = [_sylvester(min(MAX_FACTOR, pow2 >> s)) for s in range(0, pow2.bit_length() - 1, 6)] if pow2 > 1 else []
        return tuple(out + ([base] if m > 2 else []))
    raise ValueError(f"no Hadamard matrix of order {n} from Sylvester and Paley constructions: {n} is not 2^k times "
                     "1, 2, q+1 (q a prime power = 3 mod 4) or 2(q+1) (q a prime power = 1 mod 4)")


def is_hadamard_order(n: int) -> bool:
    try:
        _factors(n)
    except ValueError:
        return False
    return True


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order n (entries ±1, H Hᵀ = n I), float64."""
    h = np.ones((1, 1), dtype=np.int64)
    for f in _factors(n):
        h = np.kron(h, f)
    return torch.from_numpy(h).double()


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """diag(s) H / sqrt(n) with random signs s: QuaRot's randomised Hadamard rotation, float64."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n) / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Q of the QR factorisation of a Gaussian matrix, signs fixed so Q is Haar-distributed, float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


class OnlineHadamard(nn.Module):
    """x ↦ (H_order ⊗ I_block) x / sqrt(order) along the last dimension (width order·block): with block 1 a
    full Hadamard transform, with block = head_dim QuaRot's transform across attention heads. Applied as
    one small matmul per Kronecker factor. `fp32`: computed in float32 whatever the input dtype."""

    def __init__(self, order: int, block: int = 1, fp32: bool = False):
        super().__init__()
        self.order, self.block, self.fp32 = order, block, fp32
        self.dims = [f.shape[0] for f in _factors(order)]
        for i, f in enumerate(_factors(order)):
            self.register_buffer(f"h{i}", torch.from_numpy(f).double() / math.sqrt(f.shape[0]), persistent=False)

    @property
    def width(self) -> int:
        return self.order * self.block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        work = torch.float32 if self.fp32 else dtype
        with torch.autocast(x.device.type, enabled=False):
            y = x.to(work).reshape(-1, *self.dims, self.block)
            for i in range(len(self.dims)):
                h = getattr(self, f"h{i}").to(work)
                y = torch.movedim(torch.movedim(y, i + 1, -1) @ h.T, -1, i + 1)
            return y.reshape(x.shape).to(dtype)

    def spec(self) -> dict:
        """What reproduces this transform (`from_spec`), with a checksum of the matrix it applies."""
        return {"kind": "hadamard", "order": self.order, "block": self.block, "fp32": self.fp32,
                "sha": _checksum(self.order)}

    @classmethod
    def from_spec(cls, spec: dict, where: str = "") -> "OnlineHadamard":
        made = cls(spec["order"], spec["block"], spec["fp32"])
        if spec.get("sha") not in (None, made.spec()["sha"]):
            raise ValueError(f"{where}: the recorded online Hadamard of order {spec['order']} is not the one this "
                             "llmc constructs (recorded by another version); the model cannot be reproduced")
        return made

    def extra_repr(self) -> str:
        return f"order={self.order}, block={self.block}, fp32={self.fp32}"


@functools.lru_cache(maxsize=None)
def _checksum(order: int) -> str:
    return hashlib.sha256(hadamard(order).numpy().astype(np.int8).tobytes()).hexdigest()[:16]


def _rotate_input(module: nn.Module, args: tuple) -> tuple:
    return (module.online_rotation(args[0]),) + tuple(args[1:])


def attach(module: nn.Module, rotation: OnlineHadamard) -> None:
    """Make `module` apply `rotation` to its input before anything else (a forward pre-hook, registered
    before any observer's, so hooks, the activation quantizer and the weight all see the rotated input)."""
    if getattr(module, "online_rotation", None) is not None:
        raise RuntimeError("an online rotation is already attached to this module")
    module.online_rotation = rotation
    module.register_forward_pre_hook(_rotate_input)


def rotation_of(module: nn.Module) -> Optional[OnlineHadamard]:
    return getattr(module, "online_rotation", None)


def rotation_record(model: nn.Module) -> dict[str, dict]:
    """{full module name: spec} of every online rotation in the model."""
    return {name: m.online_rotation.spec() for name, m in model.named_modules()
            if isinstance(getattr(m, "online_rotation", None), OnlineHadamard)}


def install_record(model: nn.Module, record: dict[str, dict]) -> None:
    """Re-attach recorded online rotations (a reloaded transformed or fake-quant checkpoint)."""
    for name, spec in record.items():
        module = model.get_submodule(name)
        attach(module, OnlineHadamard.from_spec(spec, name).to(module.weight.device))
