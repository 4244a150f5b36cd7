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

