"""fedlib: a reproducible companion to FedGO, FedDM, LD3 and DMD2.

The package is thin on purpose: one module per concept (see docs/DEVELOPING.md); the
notebooks in ``notebooks/`` tell the story and call into it.
"""

__version__ = "0.1.0"
