"""biaskit: how wrong is a truncated-BPTT gradient, and how long must the truncation be."""
from .decompose import decompose, truncated_gradient
from .errors import InputError
from .recurrent import RecurrentSystem, wrap

__all__ = ["wrap", "decompose", "truncated_gradient", "RecurrentSystem", "InputError"]
__version__ = "0.1.0"
