"""Defense math as pure functions: BlurNet's L∞ and TV penalties, the PFE regularizers, blur kernels."""
from dcs.training.defenses.kernels import blur_kernel
from dcs.training.defenses.regularizers import (
    linf_depthwise_penalty,
    pfe_b1,
    pfe_b2,
    pfe_lambda,
    tv_penalty,
)

__all__ = ["blur_kernel", "linf_depthwise_penalty", "pfe_b1", "pfe_b2", "pfe_lambda", "tv_penalty"]
