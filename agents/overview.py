"""What a pretraining run shows first in TensorBoard: the overview charts, the legend, the HParams figures, the
heated table.

- :data:`OVERVIEW`: a custom scalars layout (the CUSTOM SCALARS tab): train and validation accuracy and loss side by
  side, clean and perturbed; the reward against its baseline; the policy's entropy per cell; the KL divergences; the
  content gap; the mask mean; images per second.
- :data:`LEGEND`: one line per tag group and the mask convention, for the Text tab.
- :func:`key_figures`: the scalar tags the HParams dashboard shows beside each run's settings, and
  :data:`SHOWN_SETTINGS`, the settings it shows first.
- :func:`heated_table`: the heated model's figures as one Markdown table (split rows, metric columns), in place of a
  one-point chart per figure.
"""

from __future__ import annotations

import math
import re

from classifiers.metrics import SCALAR_METRICS, WORST_GROUP


def _exact(*tags: str) -> list[str]:
    """Regular expressions matching exactly ``tags`` (the custom scalars plugin matches tags by regex)."""
    return [f"^{re.escape(tag)}$" for tag in tags]


OVERVIEW = {"overview": {
    "accuracy: train (masked batches), val clean, val perturbed": _exact("train/accuracy", "val/accuracy",
                                                                         "val_perturbed/accuracy"),
    "loss: train (masked batches), val clean, val perturbed": _exact("train/loss", "val/loss", "val_perturbed/loss"),
    "reward (batch mean) and its baseline": _exact("reward/mean", "policy/baseline"),
    "policy entropy per cell (0: Beta(1,1))": _exact("policy/entropy_per_cell"),
    "KL on the probe: to Beta(1,1) and to the step-0 policy": _exact("diagnostics/kl_uniform",
                                                                      "diagnostics/kl_initial"),
    "content gap on the probe (negative: content hidden more)": _exact("diagnostics/content_gap",
                                                                        "diagnostics/content_gap_image_specific"),
    "mask mean of the training grids (1: all kept)": _exact("mask/mean"),
    "images per second (steps only)": _exact("perf/images_per_second"),
}}
"""The custom scalars layout every pretraining run writes (``RunLogger.layout``)."""

LEGEND = "\n".join([
    "**Where to look first.** CUSTOM SCALARS: the overview (train and validation accuracy, clean and perturbed; "
    "reward against its baseline; entropy per cell; KL; mask mean; speed). IMAGES: `images/probe_masks`. HPARAMS: one "
    "row per run with every setting and the key final figures. TEXT: `heated/table`, the heated model's figures.",
    "",
    "**Mask convention.** A mask value of 1 keeps a pixel (drawn white), 0 hides it (drawn black): `multiply` dims a "
    "hidden pixel to the normalisation mean (a flat grey), `blend` replaces it by a random restyling of the image.",
    "",
    "**Tag groups.**",
    "",
    "- `train/`: the classifier's steps, on the batches as perturbed by the agent (masked): loss, accuracy, learning "
    "rate, epoch; `train/loss_scale` where the reference recipe scales the loss.",
    "- `val/`: the validation split on clean inputs, at every epoch end and every `--eval-every` steps.",
    "- `val_perturbed/`: the same images perturbed as in training (masks drawn from the current policy with a fixed "
    "seed); for agents that perturb.",
    "- `reward/`: the per-image reward, its batch mean and spread.",
    "- `policy/`: the agent's own update: `loss`; `entropy_per_cell` (the mean over cells of each cell's Beta "
    "entropy: 0 for Beta(1,1), negative as cells concentrate); `advantage_mean` and `advantage_std` (reward minus "
    "baseline, before any normalisation); `grad_norm_before_clip`; `baseline` (the reward's moving average); "
    "`alpha_mean`, `beta_mean` and their `_std` (the Beta concentrations); `lr`. Agents of stable-baselines3 add "
    "their own (`value_loss`, `approx_kl`, ...).",
    "- `mask/`: the grids the classifier trained on, as applied (after any mask budget): `mean` (the share of each "
    "image kept on average), `std`; `mask/values`, their histogram.",
    "- `diagnostics/`: the policy on a fixed probe (the first validation images), from its Beta without sampling: "
    "`kl_uniform` (KL to Beta(1,1); learning raises it, drift lowers it), `kl_initial` (KL to the step-0 policy: "
    "drift and learning both raise it), `mask_mean` (the policy's expected mask mean, before any budget), "
    "`image_spread` (0: the mask ignores the image), `cell_spread` (a fixed spatial pattern), `mask_on_background`, "
    "`_anatomy`, `_lesion`, `_marker`, `content_gap` (the mask on anatomy and lesion minus on the background; "
    "negative: the content is hidden more) with its `_mean_mask` part (what a fixed pattern explains) and "
    "`_image_specific` part; `marker_gap` likewise.",
    "- `perf/`: `images_per_second` of the steps alone; `overhead`, the share of wall time spent on logging, "
    "evaluation and checkpoints.",
    "- `biased/`: the biased classifier trained alongside (`reward biased`, the `reinforce-lff` agents).",
    "- `heated/`: the heated model at the end, on the test split (and synthrad's shifted one), clean and perturbed as "
    "in training: every figure in `heated/table` (and `heated_metrics.json`), the key ones as scalars for HPARAMS.",
    "- `images/probe_masks`: per class, a probe image, its expected mask, a sampled masked input, and the class's "
    "mean expected mask minus the overall mean (contrast stretched: blue kept more, red hidden more).",
    "- The settings: HPARAMS, the `hyperparameters` text and `config.json`.",
])
"""The Text tab's legend (``about/legend``: first in the tab's alphabetical order). A line per paragraph and per list
item: TensorBoard's Markdown breaks a line wherever the text does."""


SHOWN_SETTINGS = ("algo", "env.mask_budget", "env.mask_op", "env.reward", "env.seed")
"""The settings the HParams dashboard shows before one picks others (it shows five): what tells runs apart."""


def key_figures(split: str) -> dict[str, str]:
    """The HParams dashboard's figures of a run whose heated model is reported on ``split``: scalar tag -> display
    name (where a run has no such figure, its cell stays empty)."""
    return {f"heated/{split}/accuracy": f"heated accuracy ({split}, clean)",
            f"heated/{split}_perturbed/accuracy": f"heated accuracy ({split}, perturbed)",
            f"heated/{split}/shortcut_gap": f"shortcut gap ({split})",
            f"heated/{split}/marker_gap": f"marker gap ({split})",
            f"heated/{split}/{WORST_GROUP}": f"worst-group accuracy ({split})",
            "diagnostics/kl_uniform": "KL to Beta(1,1)",
            "diagnostics/content_gap": "content gap"}


def heated_table(figures: dict[str, float]) -> str:
    """The ``heated/<row>/<metric>`` figures as a Markdown table: a row per split (clean, then perturbed), a column
    per metric (in :data:`classifiers.metrics.SCALAR_METRICS` order, ``_`` written as a space), empty where a row
    lacks a metric."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in figures.items():
        _, row, metric = key.split("/")
        rows.setdefault(row, {})[metric] = value
    metrics = [m for m in SCALAR_METRICS if any(m in r for r in rows.values())]
    # headings with spaces, so that a narrow column breaks between words
    lines = ["| split | " + " | ".join(m.replace("_", " ") for m in metrics) + " |", "|-" * (len(metrics) + 1) + "|"]
    for row, values in rows.items():
        cells = [f"{values[m]:.3f}" if m in values and math.isfinite(values[m]) else "" for m in metrics]
        lines.append(f"| {row.replace('_perturbed', ', perturbed')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
