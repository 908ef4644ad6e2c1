"""A torchattacks ``DeepFool`` that runs pyboundary's engine: change one import line.

```python
from pyboundary.adapters.torchattacks import DeepFool        # was: from torchattacks import DeepFool

atk = DeepFool(model, steps=50, overshoot=0.02)
adv_images = atk(images, labels)                             # images in [0, 1], (N, C, H, W)
```

:class:`DeepFool` is a subclass of ``torchattacks.Attack``, so everything the base class does
applies unchanged: ``atk(images, labels)`` puts the model in eval mode (or the mode chosen with
``set_model_training_mode``) and restores it afterwards; with ``set_normalization_used(mean, std)``
the images given and returned are normalised and the attack works on the [0, 1] images behind
them; ``set_mode_targeted_by_label`` / ``_by_function`` / ``_random`` / ``_least_likely`` make it
targeted (torchattacks' own DeepFool supports only the default mode). ``forward`` calls
:func:`pyboundary.deepfool` once on the whole batch, with the model through ``get_logits`` (so
normalisation and training mode are the base class's), the box ``clamp=(0, 1)`` and the labels
as reference classes (images the model already misclassifies come back unchanged, as in
torchattacks). The returned point is refined onto the boundary (the engine's ``refine=True``;
``deepfool_kwargs={"refine": False}`` returns the overshoot point instead); images not flipped
within ``steps`` come back unchanged. As in torchattacks, the attributes (``steps``,
``overshoot``, ``p``, ``candidates``, ``deepfool_kwargs``) are read at each call, so changing them on
an attack takes effect (they are checked at construction and again at each call).

torchattacks is optional: importing this module without it raises an ImportError saying what to
install. Install it with ``pip install --no-deps torchattacks`` (its declared dependencies would
pull torchvision and possibly another torch; neither Attack nor DeepFool imports them).
"""

from __future__ import annotations

from typing import Optional

try:
    from torchattacks.attack import Attack
except ImportError as _exc:  # pragma: no cover - exercised by a test that hides torchattacks
    raise ImportError(
        "pyboundary.adapters.torchattacks needs torchattacks (pip install --no-deps torchattacks; "
        f"--no-deps keeps your torch and skips torchvision); importing it failed: {_exc}"
    ) from _exc

from .._utils.validation import check_p
from ..attacks.deepfool import deepfool
from ._engine import adversarial_points, check_in_box, engine_options

__all__ = ["DeepFool"]

_BOX = (0.0, 1.0)


class DeepFool(Attack):
    r"""DeepFool (torchattacks interface) on pyboundary's engine.

    Arguments:
        model (nn.Module): model to attack, (N, C, H, W) images in [0, 1] -> (N, L) logits.
        steps (int): maximum DeepFool steps (the engine's ``max_iter``). (Default: 50)
        overshoot (float): the total perturbation is scaled by (1 + overshoot). (Default: 0.02)
        p: 2 (torchattacks' DeepFool) or inf. (Default: 2)
        candidates (int or None): top classes considered; None = all, as torchattacks does.
        deepfool_kwargs (dict or None): further options of :func:`pyboundary.deepfool`
            (``refine``, ``batch_size``, ``prune``, ...).
    Shape:
        - images: (N, C, H, W) in [0, 1] (normalised images with ``set_normalization_used``).
        - labels: (N,) int64 true classes (None: the model's predictions); in targeted modes,
          the labels the target map function receives.
        - output: (N, C, H, W) adversarial images.
    """

    def __init__(self, model, steps: int = 50, overshoot: float = 0.02, *, p=2,
                 candidates: Optional[int] = None, deepfool_kwargs: Optional[dict] = None):
        super().__init__("DeepFool", model)
        self.steps = steps
        self.overshoot = overshoot
        self.p = check_p(p)
        self.candidates = candidates
        self.deepfool_kwargs = deepfool_kwargs
        self._engine_options()  # checked now, so a bad option fails at construction
        self.deepfool_kwargs = dict(deepfool_kwargs or {})
        self.supported_mode = ["default", "targeted"]

    def _engine_options(self) -> dict:
        """The engine's keyword options from the attack's current attributes (validated)."""
        return engine_options(steps=self.steps, candidates=self.candidates, overshoot=self.overshoot,
                              deepfool_kwargs=self.deepfool_kwargs, engine=deepfool)

    def forward(self, images, labels=None):
        """Adversarial images (N, C, H, W) for images in [0, 1]; see the class docstring."""
        adv_images, _ = self.forward_return_target_labels(images, labels)
        return adv_images

    def forward_return_target_labels(self, images, labels=None):
        """(adversarial images, the class at each of them), as torchattacks' DeepFool returns."""
        options = self._engine_options()
        p = check_p(self.p)
        images = images.detach()
        if self.device is not None:
            images = images.to(self.device)
        if labels is not None:
            labels = labels.detach().to(images.device).long()
        check_in_box(images, _BOX, "[0, 1] (torchattacks' image range)")
        target = None
        if self.targeted:
            target = self.get_target_label(images, labels).to(images.device).long()
            labels = None
        return adversarial_points(self.get_logits, images, p=p, labels=labels, target=target,
                                  clamp=_BOX, options=options, engine=deepfool)
