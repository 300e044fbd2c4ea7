"""Vector formats accepted by the operators: flat, a block of columns, per-parameter.

A vector may be a flat ``(W,)`` tensor, a ``(W, k)`` block of ``k`` vectors, or
a list of tensors shaped like the parameters (``model.parameters()`` order).
Results come back in the same form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Shapes, dtype and device that vectors must match."""

    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def size(self) -> int:
        """Total number of parameters ``W``."""
        n = 0
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            n += k
        return n

    def _check_tensor(self, t: Tensor, what: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != self.dtype:
            raise TypeError(f"{what} has dtype {t.dtype}; the operator's dtype is {self.dtype}")
        if t.device != self.device:
            raise ValueError(f"{what} is on {t.device}; the operator is on {self.device}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what} contains NaN or Inf")

    def to_matrix(self, v: Tensor | Sequence[Tensor], what: str = "v") -> tuple[Tensor, str]:
        """Return ``(V, form)`` with ``V`` of shape ``(W, k)``; ``form`` in flat/matrix/list.

        A NumPy array (``(W,)`` or ``(W, k)``, of the operator's dtype) is
        accepted too; its form is prefixed ``"numpy-"`` so that the answer comes
        back as a NumPy array.
        """
        if isinstance(v, np.ndarray):
            if v.dtype != np.dtype(str(self.dtype).replace("torch.", "")):
                raise TypeError(
                    f"{what} is a NumPy array of dtype {v.dtype}; the operator's dtype is "
                    f"{self.dtype} (convert it with .astype first)"
                )
            m, form = self.to_matrix(
                torch.from_numpy(np.ascontiguousarray(v)).to(self.device), what
            )
            return m, "numpy-" + form
        w = self.size
        if isinstance(v, (list, tuple)):
            if len(v) != len(self.shapes):
                raise ValueError(
                    f"{what} has {len(v)} tensors; expected {len(self.shapes)} (one per parameter)"
                )
            for i, (t, s) in enumerate(zip(v, self.shapes, strict=True)):
                self._check_tensor(t, f"{what}[{i}]")
                if tuple(t.shape) != s:
                    raise ValueError(f"{what}[{i}] has shape {tuple(t.shape)}; expected {s}")
            return torch.cat([t.reshape(-1) for t in v]).unsqueeze(1), "list"
        self._check_tensor(v, what)
        if v.dim() == 1:
            if v.shape[0] != w:
                raise ValueError(f"{what} has length {v.shape[0]}; expected {w}")
            return v.unsqueeze(1), "flat"
        if v.dim() == 2:
            if v.shape[0] != w:
                raise ValueError(f"{what} has {v.shape[0]} rows; expected {w}")
            return v, "matrix"
        raise ValueError(
            f"{what} must be (W,), (W, k) or a list of tensors; got shape {tuple(v.shape)}"
        )

    def from_matrix(self, m: Tensor, form: str) -> Tensor | list[Tensor]:
        """Inverse of :meth:`to_matrix`."""
        if form.startswith("numpy-"):
            return self.from_matrix(m, form[len("numpy-") :]).detach().cpu().numpy()
        if form == "flat":
            return m[:, 0]
        if form == "matrix":
            return m
        out, i = [], 0
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            out.append(m[i : i + k, 0].reshape(s))
            i += k
        return out
