"""Differential privacy: DP-SGD's mechanism, its accountant, and DP-SGD from a config.

* ``accounting``: ``compute_epsilon``, ``noise_multiplier_for_epsilon``,
  ``max_steps_for_epsilon`` (dp-accounting, RDP or PLD) for Poisson-sampled DP-SGD::

    from deepflow.privacy import compute_epsilon
    compute_epsilon(noise_multiplier=1.1, sample_rate=256 / 60000, steps=14000, delta=1e-5)

* ``mechanism``: ``clipped_gradient_sum``, ``add_noise`` and ``private_gradients``, pure JAX;
* ``dp_sgd``: ``validate_config`` and ``DpSgd``, the config's ``privacy`` section in a run, and
  what its epsilon does and does not cover.
"""
from deepflow.privacy.accounting import (ACCOUNTANTS, compute_epsilon,  # noqa: F401
                                         max_steps_for_epsilon, noise_multiplier_for_epsilon)
from deepflow.privacy.dp_sgd import MIXING_REGULARIZERS, DpSgd, validate_config  # noqa: F401
from deepflow.privacy.mechanism import (add_noise, clipped_gradient_sum,  # noqa: F401
                                        private_gradients)

__all__ = ["ACCOUNTANTS", "DpSgd", "add_noise", "clipped_gradient_sum", "compute_epsilon",
           "max_steps_for_epsilon", "noise_multiplier_for_epsilon", "private_gradients",
           "validate_config"]
