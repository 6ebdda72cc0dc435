"""The MI objective library: pure JAX functions of embeddings (spec/objectives.md)."""

from emim.objectives.diagnostics import effective_rank, embedding_std, renyi2_rank, rescaled_spectrum
from emim.objectives.estimators import cosine_critic, dv, infonce, jsd, l2_normalize, mi_estimates
from emim.objectives.gaussian import (
    EmmiConfig,
    centred,
    covariance,
    covariance_factors,
    emmi_loss,
    gaussian_mi,
    gaussian_mi_from_covariances,
    init_emmi_state,
)
from emim.objectives.jmi import barlow_twins, nt_xent, standardize, taylor_dv, vicreg
from emim.objectives.logdet import (
    LogdetConfig,
    cholesky_logdet,
    covariance_logdet,
    eigh_logdet,
    init_eig_state,
    matrix_logdet,
    power_iteration,
    taylor_coefficients,
    taylor_log,
    taylor_logdet,
)
from emim.objectives.sdmi import byol_loss, cosine_similarity, moco_infonce, sdmi_prototype_loss, simsiam_loss

__all__ = [
    "EmmiConfig",
    "LogdetConfig",
    "barlow_twins",
    "byol_loss",
    "centred",
    "cholesky_logdet",
    "cosine_critic",
    "cosine_similarity",
    "covariance",
    "covariance_factors",
    "covariance_logdet",
    "dv",
    "effective_rank",
    "eigh_logdet",
    "embedding_std",
    "emmi_loss",
    "gaussian_mi",
    "gaussian_mi_from_covariances",
    "infonce",
    "init_eig_state",
    "init_emmi_state",
    "jsd",
    "l2_normalize",
    "matrix_logdet",
    "mi_estimates",
    "moco_infonce",
    "nt_xent",
    "power_iteration",
    "renyi2_rank",
    "rescaled_spectrum",
    "sdmi_prototype_loss",
    "simsiam_loss",
    "standardize",
    "taylor_coefficients",
    "taylor_dv",
    "taylor_log",
    "taylor_logdet",
    "vicreg",
]
