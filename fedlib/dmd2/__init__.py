"""DMD2: distribution matching distillation into a one- or few-step generator (docs/methods.md section 5).

Three denoisers share one architecture and one process (:class:`fedlib.diffusion.denoiser.Denoiser`,
``D(x_t, t) -> x0_hat``): the frozen **teacher** (the "real score"), the **generator** G (initialised from
the teacher; one step maps pure noise x_T at t_max to a sample) and the **fake score** (initialised from
the teacher; keeps learning the distribution of G's current samples). Symbols follow the paper:

- generator loss (:func:`distribution_matching_loss`, :func:`dm_direction`): x = G(z); t in the middle
  2%..98% of the noise range (:func:`sample_dm_times`); x_t = alpha_t x + sigma_t eps; ``x_real`` =
  teacher(x_t), ``x_fake`` = fake_score(x_t); per-sample normaliser w = mean|x - x_real|;
  g = (x_fake - x_real) / w; loss 0.5 ||x - stopgrad(x - g)||^2 averaged over the elements, whose gradient
  with respect to x is g / (B d);
- fake-score loss (:func:`fake_score_loss`): the ordinary denoising loss on *detached* G samples at times
  drawn uniformly in noise fraction over the **whole** noise range (``fake_range = (0, 1)``);
- two time-scale update rule (:func:`ttur_schedule`): ``ratio`` fake-score updates per generator update;
  :func:`train_dmd2` iterates exactly this list;
- GAN term (:class:`GANHead`, :func:`gan_critic_loss`, :func:`gan_generator_loss`): a small classifier on
  the fake score's bottleneck features tells noised real data from noised G samples, at times over the
  whole noise range; non-saturating logistic losses. The paper's weights (1e-2 critic, 3e-3 generator) were
  set against losses averaged over B x 12288 elements (ImageNet 64x64x3) for the denoising terms but over
  B for the GAN terms; :func:`gan_weight_scale` rescales the generator's by 12288 / d so that its push
  on x keeps the paper's ratio to the DM loss's g / (B d) at our sample size d (2 on 2-D, 64 on 8x8
  digits), and leaves the critic's as it is (it is added to the fake score's denoising loss, a mean
  like itself; the derivation is in :func:`gan_weight_scale`);
- multi-step generator over fixed times (:func:`student_times`, :func:`sample_student`) trained with
  backward simulation (:func:`generator_input`);
- DMD1's regression loss (:func:`regression_loss`), averaged over elements like the DM loss, on pairs
  (x_T, teacher ODE sample) for the one-step generator, as an ablation.

Training (:func:`train_dmd2`) = :func:`fake_score_losses` and :func:`generator_losses` (each returns its
losses, like EDM's ``EDMLoss.__call__``) driven by :func:`ttur_schedule`, AdamW, gradient clipping, a
:class:`Checkpointer` of the last good state and a divergence guard. :func:`train_dmd2_seeds` trains
several seeds at once: 2-D networks (all parameters in ``nn.Linear`` layers) are vectorised into one
network whose every layer holds one weight per seed (:func:`stack_members`), so S seeds cost about one
run with an S-times larger batch; other networks run one seed after the other.

The package, one concept per module: :mod:`.losses` (times, losses, the update rule, generator inputs and
sampling), :mod:`.training` (:func:`train_dmd2`, its configuration, checkpoints and the divergence guard),
:mod:`.evaluate` (the 2-D metrics, the search, the comparison table's baselines). Stacking several seeds
into one network lives with the other stacking in :mod:`fedlib.federated`, the exact denoiser of a 2-D
mixture in :mod:`fedlib.diffusion.denoiser`; every name is re-exported here.
"""

from .losses import (backward_simulation, distribution_matching_loss, dm_direction, DM_RANGE, fake_score_loss,
                     FULL_RANGE, gan_critic_loss, gan_generator_loss, gan_weight_scale, GANHead, generate,
                     generator_input, PAPER_SAMPLE_DIM, _per_sample_dm, regression_loss, sample_dm_times,
                     sample_student, SamplerGenerator, student_times, t_from_noise_fraction, ttur_schedule,
                     warmup_factor)
from .training import (BLOW_UP_FACTOR, Checkpointer, config_dict, DivergenceError, DMD2Config, DMD2Nets, DMD2Result,
                       _Draws, fake_score_losses, _gan_head, generator_losses, generator_samples, late_average,
                       load_checkpoint, train_dmd2, train_dmd2_seeds, _trainable_copy)
from .evaluate import (coordinate_search, mode_weight_tv, off_mode_fraction, stratified_sample, teacher_baselines,
                       timed_sample, ToyEvaluator)
from ..federated import StackedLinear, can_stack, stack_members, unstack_member
from ..diffusion.denoiser import exact_denoiser
