"""Compatibility layers: other libraries' APIs running on kprivacy_nb's engine.

* :mod:`kprivacy_nb.compat.tensorflow_privacy` — TF Privacy's Keras API (``DPSequential``,
  ``DPModel``, ``DPKerasSGDOptimizer``, ``DPKerasAdamOptimizer``,
  ``compute_dp_sgd_privacy_statement``, ``compute_noise``) on Keras 3, where TF Privacy itself
  cannot be imported. A TF Privacy script needs one import changed::

      import kprivacy_nb.compat.tensorflow_privacy as tensorflow_privacy

Nothing here is imported by ``import kprivacy_nb``.
"""
