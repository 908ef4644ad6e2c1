"""Drop-in attacks for other libraries, running pyboundary's DeepFool engine underneath.

* :mod:`pyboundary.adapters.foolbox`: ``L2DeepFoolAttack``, ``LinfDeepFoolAttack`` and the tight-mode
  ``L2MinimalAttack``, ``LinfMinimalAttack``, real foolbox 3 minimisation attacks (``raw, clipped, success = attack(fmodel, inputs, criterion, epsilons=...)``).
* :mod:`pyboundary.adapters.torchattacks`: ``DeepFool``, a real ``torchattacks.Attack``
  (``atk = DeepFool(model); adv = atk(images, labels)``).

Each submodule imports its peer library when it is imported; without it the import fails with an
ImportError that says what to install. This package itself imports neither.
"""

__all__ = ["foolbox", "torchattacks"]
