"""Figures: one style and one way to write them (``style``), then one module per notebook's paper,
in the notebooks' order (00 data, 01 FedGO, 02 FedDM, 03 LD3, 04 DMD2, 05 the pipeline, 06 dataset distillation
and FedLGD, 07 LPN, 08 FedKA). Notebooks call ``plots.<name>``: every public name is re-exported here."""

from ..data import from_uint8, to_uint8  # the one images [-1, 1] <-> uint8 conversion (explorers store uint8)
from ..metrics import label_tv  # a metric; notebook 00 calls plots.label_tv
from .style import (INTERACTIVE_FIGURES, STYLE, figures_dir, image_grid, method_colours, savefig, to_numpy_images,
                    use_style)
from .data import label_heatmaps
from .fedgo import (accuracy_rounds_figure, fedgo_search_figure, gap_sweep_figure, oneshot_figure, overhead_figure,
                    teacher_student_figure, toy_weights_figure)
from .feddm import feddm_budget, feddm_quality, feddm_view
from .ld3 import ld3_explorer_view, ld3_gain_figure, ld3_grids_figure, ld3_samples_figure
from .dmd2 import (budget_gap_figure, curves_figure, density_backdrop, dm_gradient_quiver, dmd2_explorer_figure,
                   samples_over_density, search_figure, seed_band_plot)
from .pipeline import pipeline_explorer_figure, pipeline_figure
from .condense import (accuracy_figure, condense_explorer_figure, cost_figure, fedlgd_explorer_figure, fedlgd_rounds_figure,
                       synthetic_sets_figure, virtual_sets_figure)
from .fedka import domains_figure, fedka_explorer_figure, rounds_figure, target_accuracy_figure
from .lpn import learned_prior_figure, lpn_explorer_figure, residual_figure, restored_figure

__all__ = [
    "STYLE", "INTERACTIVE_FIGURES", "use_style", "figures_dir", "savefig", "to_numpy_images", "image_grid",
    "method_colours", "to_uint8", "from_uint8",
    "label_tv", "label_heatmaps",
    "toy_weights_figure", "accuracy_rounds_figure", "oneshot_figure", "teacher_student_figure", "gap_sweep_figure",
    "overhead_figure", "fedgo_search_figure",
    "feddm_quality", "feddm_budget", "feddm_view",
    "ld3_gain_figure", "ld3_grids_figure", "ld3_samples_figure", "ld3_explorer_view",
    "density_backdrop", "samples_over_density", "dm_gradient_quiver", "seed_band_plot", "budget_gap_figure",
    "search_figure", "curves_figure", "dmd2_explorer_figure",
    "pipeline_figure", "pipeline_explorer_figure",
    "synthetic_sets_figure", "accuracy_figure", "cost_figure", "condense_explorer_figure",
    "fedlgd_rounds_figure", "virtual_sets_figure", "fedlgd_explorer_figure",
    "domains_figure", "target_accuracy_figure", "rounds_figure", "fedka_explorer_figure",
    "learned_prior_figure", "residual_figure", "restored_figure", "lpn_explorer_figure",
]
