"""Test-session settings for the whole repository (unit tests and nbval alike)."""

import nbval.plugin

# nbval waits 5 s for a cell's last output after the kernel's reply (IPyNbCell.output_timeout, fixed in
# nbval 0.11): on a loaded 2-core machine notebook 04's ablation cell missed it once and every later cell
# was skipped as "timed out". A minute is still far below --nbval-cell-timeout.
_nbval_cell_init = nbval.plugin.IPyNbCell.__init__


def _patient_cell_init(self, *args, **kwargs):
    _nbval_cell_init(self, *args, **kwargs)
    self.output_timeout = 60


nbval.plugin.IPyNbCell.__init__ = _patient_cell_init


def pytest_collection_finish(session):
    # nbval's own kernels on TCP again (notebooks/conftest.py moves them to Unix sockets): with Unix
    # sockets notebook 04's ablation cell, which streams progress bars for half a minute, never got its
    # last output under nbval; the hangs the sockets were meant to cure came from papermill, not ports
    import nbval.kernel
    from jupyter_client.manager import KernelManager

    nbval.kernel.KernelManager = KernelManager
