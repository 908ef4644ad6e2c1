"""foolbox 3 attacks that run pyboundary's DeepFool engine: change one import line.

```python
import foolbox as fb
from pyboundary.adapters.foolbox import L2DeepFoolAttack      # was: from foolbox.attacks import ...

fmodel = fb.PyTorchModel(net.eval(), bounds=(0, 1))
attack = L2DeepFoolAttack(steps=50, candidates=10, overshoot=0.02)
raw, clipped, success = attack(fmodel, images, fb.criteria.Misclassification(labels), epsilons=[0.5, 1.0])
```

The attacks are subclasses of foolbox's ``MinimizationAttack``: foolbox's ``__call__`` runs them,
clips the perturbations to each epsilon and checks success with the criterion, exactly as for
foolbox's own attacks. Their ``run`` calls :func:`pyboundary.deepfool` once on the whole batch with

* the model: the foolbox model itself (its preprocessing and bound transforms included), called
  on torch tensors; only PyTorch models/tensors are accepted (the engine is PyTorch);
* the box: ``clamp=model.bounds`` (every iterate and the returned point lie in the bounds);
* the criterion: ``Misclassification(labels)`` (or a plain labels tensor) -> ``labels=labels``
  (inputs the model already misclassifies come back unchanged);
  ``TargetedMisclassification(target_classes)`` -> ``target=target_classes`` (inputs already
  classified as their target come back unchanged). Other criteria are refused;
* foolbox's argument names: ``steps`` (the engine's ``max_iter``), ``candidates`` (None: all
  classes), ``overshoot`` (applied to the total perturbation, as in foolbox), ``loss``;
  other engine options through ``deepfool_kwargs`` (e.g. ``{"refine": False}``, ``{"batch_size": 256}``).

As in foolbox, the attributes (``steps``, ``candidates``, ``overshoot``, ``loss``,
``deepfool_kwargs``) are read when the attack runs, so changing them on an attack takes effect;
``loss`` is checked when the attack runs (foolbox accepts any value at construction and raises
``ValueError('expected loss to be ...')`` from ``run``), the other options at construction and
again at each run. Inputs outside the model's bounds raise a ValueError that is also an
AssertionError (foolbox asserts the bounds); an unsupported criterion raises a TypeError that is
also a ValueError (foolbox's attacks raise ValueError for it).

Differences from foolbox's own DeepFool, on purpose: the returned point is refined onto the
boundary (the engine's ``refine=True``; pass ``deepfool_kwargs={"refine": False}`` for the plain
overshoot point), so perturbations are the engine's margins; targeted criteria are attacked
towards their target classes (foolbox's DeepFool pushes away from the top class whatever the
criterion, which only decides when to stop); inputs the engine cannot flip within ``steps`` come
back unchanged (foolbox returns its last iterate; both are reported as failures by ``success``).
``loss='logits'`` and ``'crossentropy'`` give the same attack: foolbox's cross-entropy gap
log_softmax_k - log_softmax_0 equals the logit gap f_k - f_0, so the engine uses the logit gap
for both. ``early_stop`` is accepted and ignored (a minimisation attack searches the smallest
perturbation whatever the epsilons), like foolbox's DeepFool.

``L2MinimalAttack`` / ``LinfMinimalAttack`` are the same attacks in the engine's tight mode
(``deepfool(..., tight=True)``): from DeepFool's boundary point they search for the nearest
boundary point (per input never farther than DeepFool's), for studies of the *distance* to the
boundary (foolbox's closest counterparts: FMN, DDN). Other engine modes are subclasses of
:class:`_EngineAttack` that set ``_engine_mode`` (fixed engine options) or ``_engine``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

try:
    import eagerpy as ep
    from foolbox.attacks.base import MinimizationAttack, get_criterion, raise_if_kwargs
    from foolbox.criteria import Misclassification, TargetedMisclassification
    from foolbox.distances import l2, linf
except ImportError as _exc:  # pragma: no cover - exercised by a test that hides foolbox
    raise ImportError(
        "pyboundary.adapters.foolbox needs foolbox 3 (pip install 'foolbox>=3.3'); importing it "
        f"failed: {_exc}"
    ) from _exc

from .._utils.validation import check_int
from ..attacks.deepfool import deepfool
from ._engine import adversarial_points, check_in_box, engine_options

__all__ = ["L2DeepFoolAttack", "LinfDeepFoolAttack", "L2MinimalAttack", "LinfMinimalAttack"]

_LOSSES = ("logits", "crossentropy")


class UnsupportedCriterionError(TypeError, ValueError):
    """A criterion other than Misclassification / TargetedMisclassification: a TypeError, and also
    a ValueError, which is what foolbox's own attacks raise for a criterion they do not support."""


class _EngineAttack(MinimizationAttack):
    """A foolbox minimisation attack whose ``run`` is one call of pyboundary's engine.

    Subclasses set ``distance`` (foolbox's l2 / linf), ``_p`` (2 or inf) and, for other engine
    modes, ``_engine_mode`` (engine keyword options fixed by the attack) or ``_engine``.
    """

    _p: float = 2.0
    _engine_mode: dict = {}
    _engine = staticmethod(deepfool)

    def __init__(self, *, steps: int = 50, candidates: Optional[int] = 10, overshoot: float = 0.02,
                 loss: str = "logits", deepfool_kwargs: Optional[dict] = None):
        self.steps = steps
        self.candidates = candidates
        self.overshoot = overshoot
        self.loss = loss  # checked by run, as foolbox does (its tests construct with a bad loss)
        self.deepfool_kwargs = deepfool_kwargs
        self._engine_options()  # checked now, so a bad option fails at construction
        self.deepfool_kwargs = dict(deepfool_kwargs or {})

    def _extra_options(self) -> Optional[dict]:
        """The engine options beyond foolbox's arguments (``deepfool_kwargs`` and mode additions)."""
        return self.deepfool_kwargs

    def _engine_options(self) -> dict:
        """The engine's keyword options from the attack's current attributes (validated)."""
        options = engine_options(steps=self.steps, candidates=self.candidates, overshoot=self.overshoot,
                                 deepfool_kwargs=self._extra_options(), engine=self._engine)
        options.update(self._engine_mode)
        return options

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in
                         ("steps", "candidates", "overshoot", "loss", "deepfool_kwargs"))
        return f"{type(self).__name__}({args})"

    def run(self, model: Any, inputs: Any, criterion: Any, *, early_stop: Optional[float] = None,
            **kwargs: Any) -> Any:
        """Adversarial points for ``inputs`` (same type as given: eagerpy or torch tensor).

        Args:
            model: a foolbox model of a PyTorch network (e.g. ``fb.PyTorchModel``); its bounds
                are the box.
            inputs: (N, ...) float32/float64 torch tensor or eagerpy PyTorchTensor within the bounds.
            criterion: ``Misclassification(labels)``, ``TargetedMisclassification(targets)`` or
                a labels tensor (N,).
            early_stop: ignored (see the module docstring).
        Raises:
            ValueError: ``loss`` is not 'logits' or 'crossentropy' (foolbox's message), or the
                inputs are outside the model's bounds (also an AssertionError, as in foolbox).
            UnsupportedCriterionError: another criterion (a TypeError and a ValueError).
        """
        raise_if_kwargs(kwargs)
        if self.loss not in _LOSSES:
            raise ValueError(f"expected loss to be 'logits' or 'crossentropy', got {self.loss!r}")
        options = self._engine_options()
        x, restore_type = ep.astensor_(inputs)
        del inputs, kwargs
        if not isinstance(x, ep.PyTorchTensor):
            raise TypeError(f"pyboundary's foolbox attacks run on PyTorch: inputs must be torch tensors "
                            f"(or eagerpy PyTorchTensor), got {type(x.raw).__name__}")
        clamp = (float(model.bounds.lower), float(model.bounds.upper))
        check_in_box(x.raw, clamp, "the model's bounds")
        labels, target = _criterion_classes(get_criterion(criterion), x.raw)
        adv, _ = adversarial_points(_TorchModel(model), x.raw, p=self._p, labels=labels, target=target,
                                    clamp=clamp, options=options, engine=self._engine)
        return restore_type(ep.astensor(adv))


class _TorchModel:
    """A foolbox model as the torch callable (N, ...) -> (N, L) logits the engine expects."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.raw if isinstance(out, ep.Tensor) else out


def _criterion_classes(criterion, x: torch.Tensor):
    """(labels, target): one of them an (N,) int64 tensor on x's device, the other None."""
    if isinstance(criterion, Misclassification):
        return _classes(criterion.labels, "Misclassification labels", x), None
    if isinstance(criterion, TargetedMisclassification):
        return None, _classes(criterion.target_classes, "TargetedMisclassification target_classes", x)
    raise UnsupportedCriterionError("pyboundary's foolbox attacks support the Misclassification and "
                                    "TargetedMisclassification criteria (or a labels tensor), "
                                    f"got {criterion!r}")


def _classes(t, what: str, x: torch.Tensor) -> torch.Tensor:
    raw = t.raw if isinstance(t, ep.Tensor) else t
    raw = torch.as_tensor(raw, device=x.device)
    if raw.is_floating_point() or raw.dtype == torch.bool or raw.shape != (x.shape[0],):
        raise ValueError(f"{what} must be integer classes of shape ({x.shape[0]},), "
                         f"got {raw.dtype} of shape {tuple(raw.shape)}")
    return raw.to(torch.int64)


class L2DeepFoolAttack(_EngineAttack):
    """DeepFool, L2 (foolbox ``L2DeepFoolAttack`` interface), on pyboundary's engine.

    Args:
        steps: maximum DeepFool steps (the engine's ``max_iter``).
        candidates: number of top classes considered (None: all).
        overshoot: the total perturbation is scaled by (1 + overshoot).
        loss: 'logits' or 'crossentropy' (same attack, see the module docstring).
        deepfool_kwargs: further options of :func:`pyboundary.deepfool`.
    """

    distance = l2
    _p = 2.0


class LinfDeepFoolAttack(_EngineAttack):
    """DeepFool, L-inf (foolbox ``LinfDeepFoolAttack`` interface), on pyboundary's engine.

    Same arguments as :class:`L2DeepFoolAttack`.
    """

    distance = linf
    _p = math.inf


class _MinimalAttack(_EngineAttack):
    """The engine's tight mode: DeepFool, then the search for the nearest boundary point."""

    _engine_mode = {"tight": True}

    def __init__(self, *, steps: int = 50, candidates: Optional[int] = 10, overshoot: float = 0.02,
                 tight_steps: Optional[int] = None, loss: str = "logits",
                 deepfool_kwargs: Optional[dict] = None):
        extra = dict(deepfool_kwargs or {})
        if "tight" in extra:
            raise TypeError("deepfool_kwargs: 'tight' is set by the attack itself (a minimal attack "
                            "always runs the tight mode; use L2DeepFoolAttack for plain DeepFool)")
        if tight_steps is not None and "tight_steps" in extra:
            raise TypeError("tight_steps given twice (argument and deepfool_kwargs)")
        self.tight_steps = tight_steps
        super().__init__(steps=steps, candidates=candidates, overshoot=overshoot, loss=loss,
                         deepfool_kwargs=extra)

    def _extra_options(self) -> dict:
        if self.tight_steps is None:
            return self.deepfool_kwargs
        check_int("tight_steps", self.tight_steps, minimum=1)
        return {**self.deepfool_kwargs, "tight_steps": self.tight_steps}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", tight_steps={self.tight_steps!r})"


class L2MinimalAttack(_MinimalAttack):
    """Minimal L2 perturbation (nearest boundary point found), on pyboundary's tight engine mode.

    Args:
        steps, candidates, overshoot: of the DeepFool phase, as in :class:`L2DeepFoolAttack`.
        tight_steps: norm-budget steps of the tight search per input (None: the engine's default,
            :data:`pyboundary.attacks.tight.TIGHT_STEPS`); one forward and one reverse row each.
        loss: 'logits' or 'crossentropy' (same attack).
        deepfool_kwargs: further options of :func:`pyboundary.deepfool` (not ``tight``), e.g.
            ``{"tight_classes": 0}`` to skip the searches towards other classes (faster, a worse
            tail).
    """

    distance = l2
    _p = 2.0


class LinfMinimalAttack(_MinimalAttack):
    """Minimal L-inf perturbation (nearest boundary point found), on pyboundary's tight engine mode.

    Same arguments as :class:`L2MinimalAttack`.
    """

    distance = linf
    _p = math.inf
