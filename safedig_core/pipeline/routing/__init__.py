"""Robustness-aware pre-training routing (docs/METHOD_NOTES.md §3): which positions deserve an SAE.

Runs on the per-prompt pooled activations of a collected store, **source domain only** (routing
happens before the target domain is seen: target prompts are never read). Per candidate position `p`:

- **Transfer `T_p`** — leave-one-category-out (LOCO) over the source unsafe categories. For each held-out
  category `c` a harmful direction is fitted on the other categories vs safe and scored by AUROC on `c`
  vs safe. The safe prompts are split in `cv_folds` folds so that the safe prompts a direction is scored
  on were never used to fit it (`T_c` = mean over the folds). `T_p` = mean of `T_c` over the held-out
  categories, `T_min` = their minimum (the worst unseen risk); both are reported, `transfer_stat`
  picks which one enters the score.
- **Stability `S_p`** — agreement of harmful directions (difference of means) across sampler-step bins
  (`step_bins` contiguous bins of the recorded steps, e.g. early/mid/late) and across categories (each
  category vs safe), as the mean pairwise cosine. Raw cosines of estimated directions shrink towards 0
  with sampling noise (in width 3072 a weak but perfectly stable direction would look unstable), so
  each cosine is *attenuation-corrected*: prompts are split in random halves, the cosine between
  direction `a` of one half and `b` of the other is divided by `sqrt(r_a r_b)`, where `r_a` is the
  split-half cosine of `a` with itself (its reliability), floored at `reliability_floor` so that pure
  noise is not blown up. Negative agreement (a direction that flips) is as useless to one gate as none,
  so each part is `max(0, mean cosine)` in [0, 1]; `S_p` = mean of the parts that are defined (the step
  part needs at least 2 recorded steps, the category part at least 2 categories).
- **Separability `A_p`** — in-domain AUROC of safe vs unsafe (all source categories), cross-validated
  with `cv_folds` folds stratified by label and category; the folds are over prompts, so the rows of
  one prompt at different steps never sit on both sides.
- **Score** `R_p = (w_T T_p + w_S S_p + w_A A_p) / (w_T + w_S + w_A)` over the defined components;
  defaults `w_T = 0.5, w_S = 0.25, w_A = 0.25`: transfer is what the method is about, and separability
  alone is exactly the "fixed layer" trap (a position can separate the known risks through
  category-specific features that say nothing about a new risk).

Rows are the pooled vectors of one prompt at one recorded step; directions are fitted on rows (one
direction for all steps, as one gate uses), and folds are over prompts. AUROCs compare unsafe and safe
rows *of the same recorded step* (`within_step=True`, the pair-weighted mean of per-step AUROCs): the
activations of a DiT shift with the timestep (adaLN modulation), and that shift, common to safe and
unsafe, is a nuisance that would otherwise swamp the harmful signal in a pooled ranking;
`within_step=False` pools all rows (one threshold for all steps). The harmful direction is the
difference of means (`probe="diffmean"`, default) or a ridge (shrinkage-LDA) probe
`(Σ_w + λ tr(Σ_w)/d I)⁻¹ (μ₁ − μ₀)` (`probe="ridge"`; Σ_w from within-class, within-step residuals;
solved in the dual when rows < width, O(n² d) per fit).

**Fewer than 2 source categories** (LOCO impossible): with `fallback="split"` (default) `T_p` falls back
to the cross-validated AUROC over held-out *prompts* of the one category (so it equals `A_p` and cannot
tell transfer from fit); the report says so in `transfer_mode = "within-category split"` and in its
notes. `fallback="raise"` refuses instead. Unsafe prompts without a category count as one category
named `(none)`.

**Route: top-K with a diversity rule.** Candidates are taken greedily in order of `R_p` (ties: higher
`A_p`, then name). A candidate is *useful* when its transfer statistic is at least `useful_auroc`
(default 0.6). Constraints:
  1. *gap*: two selected positions of the same stream (img / txt) are more than `min_gap` blocks apart
     (default 2: block distance 1 or 2 is refused). Blocks are numbered along the whole stack, so FLUX's
     last double block and first single block are neighbours;
  2. *group cap*: at most `ceil(K/2)` positions (or `group_cap`) from one functional group
     (`positions.group`: text binding / visual binding / rendering).
Passes, each filling what the previous one left: (1) useful candidates under both constraints; (2)
useful candidates under the gap rule only — the cap is lifted only because no other group has a useful
candidate left; (3) any candidate under the gap rule (fewer than K useful positions exist); (4) any
candidate (the stack is too small for the gap). Every selection records its pass, and each relaxation
adds a note to the report.

`best_fixed` is the single position with the highest `A_p` (ties: higher `R_p`, then name): the "fixed
layer" baseline for the ablation of docs/METHOD_NOTES.md §7.

The store is used only through a small interface (duck typing, see `StoreLike`): `.family`,
`.positions`, `.prompts` (records with `label`, `category`, `domain`, `id`) and `.pooled(p, prompts)`
returning `x [m, d]`, `prompt [m]`, `step [m]`; optionally `.layout` (a `ModelLayout`). Without a layout
the block counts are inferred from the collected positions, and depth is relative to them.

Modules: `scores` (T, S, A and AUROC), `select` (the diversity rule), `route` (the whole pass over a store),
`report` (JSON) and `figure` (PNG); `config` holds the settings and the error type.
"""
from .config import RoutingConfig, RoutingError
from .figure import plot_report
from .report import PositionScore, RoutingReport
from .route import infer_layout, route
from .scores import auroc, score_position, step_bins, stratified_auroc
from .select import select_positions

__all__ = ["PositionScore", "RoutingConfig", "RoutingError", "RoutingReport", "auroc", "infer_layout", "plot_report",
           "route", "score_position", "select_positions", "step_bins", "stratified_auroc"]
