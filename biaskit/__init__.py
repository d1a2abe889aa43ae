"""biaskit: how wrong is a truncated-BPTT gradient, and how long must the truncation be."""
from .audit import Audit, audit
from .bias import bias_bound, calibration, exact_kappa
from .decay import fit_decay
from .decompose import decompose, state_gradient_norms, truncated_gradient
from .errors import InputError
from .recurrent import RecurrentSystem, wrap
from .synthetic import synthetic_bias

__all__ = ["wrap", "decompose", "state_gradient_norms", "truncated_gradient", "fit_decay", "bias_bound", "exact_kappa",
           "calibration", "audit", "Audit", "synthetic_bias", "RecurrentSystem", "InputError"]
__version__ = "0.2.0"
