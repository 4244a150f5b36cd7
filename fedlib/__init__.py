"""fedlib: a reproducible companion to FedGO, FedDM, LD3 and DMD2.

The package is thin on purpose: one module per concept (see docs/DEVELOPING.md); the
notebooks in ``notebooks/`` tell the story and call into it.
"""

__version__ = "0.1.0"

# The plug-ins register themselves in the registries below them (fedlib.methods) when imported; importing
# them here, above everything, means every `import fedlib.<anything>` sees them, and no core module has to
# import a plug-in to know its name.
from . import datafree  # noqa: E402,F401
from . import fedka  # noqa: E402,F401
