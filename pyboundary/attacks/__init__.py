"""Attacks: the batched DeepFool engine (:mod:`pyboundary.attacks.deepfool`) and PGD
(:mod:`pyboundary.attacks.pgd`).

The functions are not re-exported here, so ``import pyboundary.attacks.deepfool`` always gives
the module; use ``from pyboundary.attacks.deepfool import deepfool`` or ``pyboundary.deepfool``.
"""
