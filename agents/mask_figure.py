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

The panels are laid out as one picture in one set of axes, as a figure of dozens of axes is slow to build and draw at
every image step of a run; it is built without pyplot (``classifiers.figures``), and the runner draws it with
``classifiers.figures.draw``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

ROWS_PER_COLUMN = 6
"""Classes per column of panels: more classes start another column, so the figure stays about as wide as tall."""
MAX_CLASSES = 24
"""Classes drawn at most (the first ones present in the probe), so a task of 165 classes stays readable."""
PANEL_INCHES = 1.2
"""Side of one panel; at the figure's dpi a 32-pixel image is upscaled almost four times."""
GAP = 0.25
"""Space between panels, as a share of a panel's side (a class's name sits in the space above its row)."""
HEADINGS = ("expected mask", "masked input", "class - overall")
"""The headings of panels 2-4, over a column's first row (panel 1 is titled with its class in every row)."""
OPERATOR_WORDS = {"multiply": "multiply: a hidden pixel shows the normalisation mean (grey)",
                  "blend": "blend: a hidden pixel shows the image's random restyling"}
"""What panel 3 shows, per mask operator (in the figure's title)."""
DIFFERENCE_COLOURS = "RdBu"
"""The last panel's diverging colour map: blue above 0 (kept more than on average), red below (hidden more)."""


def _rgb(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) values in [0, 1] as an RGB picture (H, W, 3): one channel as grey, colour as it is."""
    x = x.detach().float().clamp(0, 1).cpu()
    return (x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]).permute(1, 2, 0).numpy()


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
        mask_op: the environment's mask operator, named in the figure's title.
    """
    present = sorted(set(labels.tolist()))[:MAX_CLASSES]
    first = [int((labels == c).nonzero()[0, 0]) for c in present]
    difference = (class_means[present, 0] - expected.mean(0)[0]).cpu().numpy()
    scale = max(float(np.abs(difference).max()), 1e-6)
    norm = Normalize(-scale, scale)
    columns = math.ceil(len(present) / ROWS_PER_COLUMN)
    rows = math.ceil(len(present) / columns)
    size = images.shape[-1]
    gap = max(1, round(GAP * size))
    step = size + gap
    mosaic = np.ones((rows * step + gap, columns * (4 * step + gap), 3))  # white between the panels
    fig = Figure(figsize=(4 * columns * PANEL_INCHES + 0.9, rows * PANEL_INCHES + 1.0), dpi=100)
    ax = fig.add_axes((0.01, 0.01, 0.9, 1 - 0.8 / (rows * PANEL_INCHES + 1.0)))
    text = {"fontsize": 8, "va": "bottom"}
    for n, (c, i) in enumerate(zip(present, first)):
        row, block = n % rows, n // rows
        panels = (_rgb(images[i]), _rgb(expected[i]), _rgb(masked[i]),
                  colormaps[DIFFERENCE_COLOURS](norm(difference[n]))[..., :3])
        top = gap + row * step
        for k, panel in enumerate(panels):
            left = block * (4 * step + gap) + gap + k * step
            mosaic[top:top + size, left:left + size] = panel
            if k == 0:
                ax.text(left - 0.5, top - 1, class_names[c], ha="left", **text)
            elif row == 0:
                ax.text(left + size / 2 - 0.5, top - 1, HEADINGS[k - 1], ha="center", **text)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(f"Each row: the first validation image of a class (clean, titled with the class), its expected "
                 f"mask, the classifier's input under a sampled mask ({OPERATOR_WORDS[mask_op]}), and the class's "
                 f"mean expected mask minus the mean over the probe. Masks: white = kept (1), black = hidden (0). "
                 f"Last panel: blue = kept more, red = hidden more than on average, scale +-{scale:.3g}",
                 fontsize=8, wrap=True)
    bar = fig.add_axes((0.93, 0.1, 0.012, 0.7))
    fig.colorbar(ScalarMappable(norm, DIFFERENCE_COLOURS), cax=bar).ax.tick_params(labelsize=7)
    return fig
