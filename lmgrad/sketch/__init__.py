"""Random projections of per-example gradient pytrees (see ``projectors.py`` for the design)."""
from lmgrad.sketch.hashing import GENERATOR_VERSION
from lmgrad.sketch.projectors import (
    KINDS,
    GaussianProjector,
    IdentityProjector,
    Projector,
    RademacherProjector,
    SJLTProjector,
    gaussian_matrix,
    make_projector,
    unflatten,
)

__all__ = [
    "GENERATOR_VERSION",
    "KINDS",
    "GaussianProjector",
    "IdentityProjector",
    "Projector",
    "RademacherProjector",
    "SJLTProjector",
    "gaussian_matrix",
    "make_projector",
    "unflatten",
]
