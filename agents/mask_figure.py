"""The probe drawn for TensorBoard: what the policy does to an image of each class, and where its masks differ by class.

One row per class (its first image in the probe batch, ``agents.diagnostics``), four panels:

1. the clean image;
2. its expected mask (``agents.diagnostics.expected_masks``) on a fixed scale: white = 1 = kept, black = 0 = hidden;
3. the classifier's input under a mask sampled from the policy, as the environment applies it
   (``PretrainCore.inputs``: ``multiply`` dims a hidden pixel to the normalisation mean, a flat grey; ``blend``
   replaces it by a random restyling of the image), shown in pixel units;
4. the class's mean expected mask minus the mean over every probe image, on a diverging scale stretched to the
   largest difference (named in the title; blue = kept more, red = hidden more): a policy whose masks are all near
   0.5 still shows here what it does differently per class, which the fixed scale of panel 2 leaves as flat grey.

The figure is built without pyplot (``classifiers.figures``); the runner draws it with ``classifiers.figures.draw``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

ROWS_PER_COLUMN = 6
"""Classes per column of panels: more classes start another column, so the figure stays about as wide as tall."""
MAX_CLASSES = 24
"""Classes drawn at most (the first ones present in the probe), so a task of 165 classes stays readable."""
PANEL_INCHES = 1.3
"""Side of one panel; at the figure's dpi a 32-pixel image is upscaled about four times."""
OPERATOR_WORDS = {"multiply": "multiply: a hidden pixel shows the normalisation mean (grey)",
                  "blend": "blend: a hidden pixel shows the image's random restyling"}
"""What panel 3 shows, per mask operator (in the figure's title)."""


def _picture(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) values in [0, 1] as imshow takes them: (H, W) for one channel, (H, W, 3) for colour."""
    x = x.detach().float().clamp(0, 1).cpu()
    return x[0].numpy() if x.shape[0] == 1 else x[:3].permute(1, 2, 0).numpy()


def probe_figure(images: torch.Tensor, expected: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor,
                 class_means: torch.Tensor, class_names: Sequence[str], mask_op: str = "multiply") -> Figure:
    """The probe's figure (module docstring).

    Args:
        images: the probe's clean images, (P, C, H, W) with values in [0, 1].
        expected: their expected masks, (P, 1, H, W).
        masked: the classifier's inputs under a sampled mask, in pixel units, (P, C, H, W).
        labels: the images' classes, (P,).
        class_means: each class's mean expected mask (``agents.diagnostics.mean_mask_per_class``), (K, 1, H, W).
        class_names: the K class names.
        mask_op: the environment's mask operator, named in panel 3's heading.
    """
    present = sorted(set(labels.tolist()))[:MAX_CLASSES]
    first = [int((labels == c).nonzero()[0, 0]) for c in present]
    difference = class_means[present, 0] - expected.mean(0)[0]
    scale = max(float(difference.abs().max()), 1e-6)
    columns = math.ceil(len(present) / ROWS_PER_COLUMN)
    rows = math.ceil(len(present) / columns)
    fig = Figure(figsize=(4 * columns * PANEL_INCHES + 0.6, rows * PANEL_INCHES + 1.1), dpi=100)
    axes = fig.subplots(rows, 4 * columns, squeeze=False)
    gray = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}
    headings = ("expected mask", "masked input", "class - overall")
    shown = None
    for ax in axes.flat:
        ax.set_axis_off()
    for n, (c, i) in enumerate(zip(present, first)):
        row, block = n % rows, n // rows
        panels = axes[row, 4 * block:4 * block + 4]
        panels[0].imshow(_picture(images[i]), **gray)
        panels[1].imshow(_picture(expected[i]), **gray)
        panels[2].imshow(_picture(masked[i]), **gray)
        shown = panels[3].imshow(difference[n].cpu().numpy(), cmap="RdBu", vmin=-scale, vmax=scale,
                                 interpolation="nearest")
        panels[0].set_title(class_names[c], fontsize=8, loc="left")
        if row == 0:
            for ax, heading in zip(panels[1:], headings):
                ax.set_title(heading, fontsize=8)
    fig.suptitle(f"Each row: the first validation image of a class (clean, titled with the class), its expected "
                 f"mask, the classifier's input under a sampled mask ({OPERATOR_WORDS[mask_op]}), and the class's "
                 f"mean expected mask minus the mean over the probe. Masks: white = kept (1), black = hidden (0). "
                 f"Last panel: blue = kept more, red = hidden more than on average, scale +-{scale:.3g}",
                 fontsize=8, wrap=True)
    fig.subplots_adjust(left=0.01, right=0.92, bottom=0.01, top=1 - 0.9 / (rows * PANEL_INCHES + 1.1),
                        wspace=0.05, hspace=0.25)
    bar = fig.add_axes((0.935, 0.1, 0.012, 0.7))
    fig.colorbar(shown, cax=bar).ax.tick_params(labelsize=7)
    return fig
