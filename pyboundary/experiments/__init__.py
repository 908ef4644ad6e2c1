"""Study pipelines and report builders, one module per study:

* :mod:`~pyboundary.experiments.detection_eval`: the curvature detector on clean vs perturbed inputs;
* :mod:`~pyboundary.experiments.detection_study`: the full detection study (bootstrap AUC, calibrated
  TPR, label recovery, noise control, perturbation scales, Table II), the CLI ``detect`` and the
  ImageNet benchmark;
* :mod:`~pyboundary.experiments.curvature_report`: curvature statistics of a model on data;
* :mod:`~pyboundary.experiments.finetune`: margins along DeepFool directions before/after fine-tuning;
* :mod:`~pyboundary.experiments.tracking_run`: margin dynamics while a network trains.

Nothing is re-exported here (module names would be shadowed); the public functions are lifted to
:mod:`pyboundary`.
"""
