"""Vector formats accepted by the operators: flat, a block of columns, per-parameter.

A vector may be a flat ``(W,)`` tensor, a ``(W, k)`` block of ``k`` vectors, a
list of tensors shaped like the parameters (``model.parameters()`` order), or a
list of ``(*p.shape, k)`` tensors holding ``k`` vectors (curvlinops' matrix
form); NumPy arrays (or lists of them) of the operator's dtype are accepted
too. Results come back in the same form.
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
        """Return ``(V, form)`` with ``V`` of shape ``(W, k)``.

        ``form`` is ``"flat"``, ``"matrix"``, ``"list"`` (parameter-shaped
        tensors) or ``"list-matrix"`` (``(*p.shape, k)`` tensors). A NumPy
        array (``(W,)`` or ``(W, k)``) or a list of them, of the operator's
        dtype, is accepted too; its form is prefixed ``"numpy-"`` so that the
        answer comes back as NumPy.
        """
        if isinstance(v, np.ndarray):
            m, form = self.to_matrix(self._from_numpy(v, what), what)
            return m, "numpy-" + form
        w = self.size
        if isinstance(v, (list, tuple)):
            if v and all(isinstance(t, np.ndarray) for t in v):
                m, form = self.to_matrix(
                    [self._from_numpy(t, f"{what}[{i}]") for i, t in enumerate(v)], what
                )
                return m, "numpy-" + form
            return self._list_to_matrix(v, what)
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

    def _from_numpy(self, a: np.ndarray, what: str) -> Tensor:
        if a.dtype != np.dtype(str(self.dtype).replace("torch.", "")):
            raise TypeError(
                f"{what} is a NumPy array of dtype {a.dtype}; the operator's dtype is "
                f"{self.dtype} (convert it with .astype first)"
            )
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _list_to_matrix(self, v: Sequence[Tensor], what: str) -> tuple[Tensor, str]:
        """Per-parameter tensors, all ``p.shape`` (one vector) or all ``(*p.shape, k)``."""
        if len(v) != len(self.shapes):
            raise ValueError(
                f"{what} has {len(v)} tensors; expected {len(self.shapes)} (one per parameter)"
            )
        for i, t in enumerate(v):
            self._check_tensor(t, f"{what}[{i}]")
        if all(tuple(t.shape) == s for t, s in zip(v, self.shapes, strict=True)):
            return torch.cat([t.reshape(-1) for t in v]).unsqueeze(1), "list"
        ks = {t.shape[-1] for t in v if t.dim() > 0}
        if len(ks) == 1 and all(
            t.dim() == len(s) + 1 and tuple(t.shape[:-1]) == s
            for t, s in zip(v, self.shapes, strict=True)
        ):
            (k,) = ks
            return torch.cat([t.reshape(-1, k) for t in v]), "list-matrix"
        for i, (t, s) in enumerate(zip(v, self.shapes, strict=True)):
            if tuple(t.shape) != s and tuple(t.shape[:-1]) != s:
                raise ValueError(
                    f"{what}[{i}] has shape {tuple(t.shape)}; expected {s} (one vector) "
                    f"or {(*s, 'k')} (k vectors)"
                )
        raise ValueError(
            f"{what} mixes forms: give every tensor its parameter's shape (one vector), or "
            f"every tensor (*p.shape, k) with the same k (k vectors); got shapes "
            f"{[tuple(t.shape) for t in v]}"
        )

    def from_matrix(self, m: Tensor, form: str) -> Tensor | list[Tensor]:
        """Inverse of :meth:`to_matrix`."""
        if form.startswith("numpy-"):
            out = self.from_matrix(m, form[len("numpy-") :])
            if isinstance(out, list):
                return [t.detach().cpu().numpy() for t in out]
            return out.detach().cpu().numpy()
        if form == "flat":
            return m[:, 0]
        if form == "matrix":
            return m
        out, i = [], 0
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            if form == "list":
                out.append(m[i : i + k, 0].reshape(s))
            else:
                out.append(m[i : i + k].reshape(*s, m.shape[1]))
            i += k
        return out
