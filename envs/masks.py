"""Noise-mask operations, batched and device-agnostic: grid -> nearest upsample -> Gaussian blur -> apply.

Two operators apply a mask ``M`` (values in [0, 1]) to a normalised image ``x``: ``multiply`` (the paper's),
``M * x``, which dims where ``M`` is low and leaves texture readable; and ``blend``, ``M * x + (1 - M) * S(x)``, which
replaces the image's style by a random restyled copy of itself where ``M`` is low (:func:`random_style`), keeping its
anatomy.

Upsampling and blurring are both linear and act on rows and columns separately, so the whole
grid-to-mask map is ``A @ grid @ A.T`` with one (H, G) matrix ``A`` built once from the two steps:
two small matrix products per batch instead of an upsample, two reflect pads and two convolutions
(on a 2-core CPU, 32 masks of 64 px from a 16 x 16 grid: 0.04 ms instead of 1.9 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian weights, the same as torchvision's ``gaussian_blur`` uses."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=dtype, device=device)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def check_blur(kernel_size: int, sigma: float, image_size: int) -> None:
    """Raise ``ValueError`` naming the fix when a blur cannot be applied to images of ``image_size``."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel {kernel_size} must be a positive odd number (for example 13)")
    if kernel_size // 2 >= image_size:
        raise ValueError(f"blur kernel {kernel_size} is too large for {image_size} px images (reflect padding "
                         f"needs kernel // 2 < image size); use at most {2 * image_size - 1}")
    if not sigma > 0:
        raise ValueError(f"blur sigma {sigma} must be positive")


def gaussian_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; ``kernel`` is 1-D and odd."""
    k = kernel.numel()
    pad = k // 2
    c = x.shape[1]
    kx = kernel.to(x.dtype).view(1, 1, 1, k).expand(c, 1, 1, k)
    ky = kernel.to(x.dtype).view(1, 1, k, 1).expand(c, 1, k, 1)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), ky, groups=c)


MASK_OPS = ("multiply", "blend")
"""How a mask acts on the image: dim it (the paper's) or blend it with a restyled copy of itself."""
STYLE_WIDTH = 4
"""Channels of the random style network's hidden layer."""
STYLE_SLOPE = 0.2
"""Negative slope of its leaky ReLU."""


def random_style(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A restyled copy of each normalised image of (B, C, H, W): a random shallow convolutional network drawn per image
    (two 3 x 3 convolutions, C -> :data:`STYLE_WIDTH` -> C channels, N(0, 1) weights, a leaky ReLU between them), its
    output standardised and given the image's own mean and standard deviation, as in GIN-IPA's global intensity
    non-linear augmentation (Ouyang et al. 2021) and RandConv (Xu et al. 2021).

    Local linear filters with a random non-linear response change the intensity curve (which tissue is bright) and
    the texture (edges, speckle, noise), and keep where the structures are: the anatomy stays, its style goes.
    Random numbers come from ``generator`` (None: the global one)."""
    b, c, h, w = x.shape
    dev = x.device
    w1 = torch.randn(b * STYLE_WIDTH, c, 3, 3, generator=generator, device=dev, dtype=x.dtype)
    w2 = torch.randn(b * c, STYLE_WIDTH, 3, 3, generator=generator, device=dev, dtype=x.dtype)
    hidden = F.leaky_relu(F.conv2d(x.reshape(1, b * c, h, w), w1, padding=1, groups=b), STYLE_SLOPE)
    out = F.conv2d(hidden, w2, padding=1, groups=b).view(b, c, h, w)
    dims = (1, 2, 3)
    out = (out - out.mean(dims, keepdim=True)) / (out.std(dims, keepdim=True) + 1e-6)
    return out * x.std(dims, keepdim=True) + x.mean(dims, keepdim=True)


def hold_mean(grid: torch.Tensor, budget: float) -> torch.Tensor:
    """Scale each grid of (B, G, G) so that its mean is ``budget``, clipping at 1: ``min(s_b * m, 1)`` with the one
    ``s_b >= 0`` per image that gives mean ``budget`` (the mask *budget*: how much of the image is kept on average).

    The policy then decides where the noise goes, not how much. Exact, by water-filling: with the values sorted in
    decreasing order and the ``k`` largest clipped at 1, ``s = (budget * N - k) / (sum of the other values)``, for the
    smallest ``k`` where no other value is pushed past 1. A grid whose cells are all 0 becomes the constant
    ``budget``. ``budget`` must lie in (0, 1).
    """
    b, n = grid.shape[0], grid[0].numel()
    flat = grid.reshape(b, n).float()
    ordered, _ = flat.sort(dim=1, descending=True)
    k = torch.arange(n + 1, device=grid.device, dtype=flat.dtype)
    # rest[k]: the sum of all but the k largest values, summed from the smallest (no cancellation when it is tiny)
    rest = torch.cat([ordered.flip(1).cumsum(1).flip(1), flat.new_zeros(b, 1)], dim=1)
    scale = (budget * n - k) / rest.clamp_min(1e-12)
    below = torch.cat([ordered, flat.new_zeros(b, 1)], dim=1)  # the largest value left unclipped with k clipped
    valid = (scale * below <= 1 + 1e-6) & (rest > 1e-12) & (k <= budget * n)
    first = valid.float().argmax(1, keepdim=True)
    s = scale.gather(1, first)
    held = (flat * s).clamp(max=1.0)
    empty = ~valid.any(1, keepdim=True)
    held = torch.where(empty, torch.full_like(held, budget), held)
    return held.view_as(grid).to(grid.dtype)


class NoiseMask(nn.Module):
    """Turn (B, G, G) grids into (B, 1, H, W) masks and apply them to normalised images.

    Args:
        image_size: side H = W of the images.
        grid: side G of the mask grid; at most ``image_size``.
        blur_kernel: odd Gaussian kernel size (the paper: 13); 1 disables the blur.
        blur_sigma: Gaussian standard deviation in pixels (the paper: 6).
    """

    def __init__(self, image_size: int, grid: int, blur_kernel: int = 13, blur_sigma: float = 6.0) -> None:
        super().__init__()
        if not 1 <= grid <= image_size:
            raise ValueError(f"grid {grid} must lie in 1..{image_size} (the image size); use a smaller --grid")
        check_blur(blur_kernel, blur_sigma, image_size)
        self.image_size, self.grid = image_size, grid
        self.register_buffer("kernel", gaussian_kernel1d(blur_kernel, blur_sigma), persistent=False)
        self.register_buffer("operator", self._operator(), persistent=False)

    def upsample(self, grid: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour upsampling of (B, G, G) to (B, 1, H, W)."""
        return F.interpolate(grid.unsqueeze(1), size=(self.image_size, self.image_size), mode="nearest")

    def reference(self, grid: torch.Tensor) -> torch.Tensor:
        """The mask computed step by step (upsample, then blur): what :meth:`forward` computes in one go."""
        mask = self.upsample(grid.float())
        return gaussian_blur(mask, self.kernel) if self.kernel.numel() > 1 else mask

    def _operator(self) -> torch.Tensor:
        """``A`` (H, G): column g is the upsampled, blurred image of a row that is 1 at cell g and 0 elsewhere."""
        eye = torch.eye(self.grid).view(self.grid, 1, 1, self.grid)
        cols = F.interpolate(eye, size=(1, self.image_size), mode="nearest")
        if self.kernel.numel() > 1:
            pad = self.kernel.numel() // 2
            cols = F.conv2d(F.pad(cols, (pad, pad, 0, 0), mode="reflect"), self.kernel.view(1, 1, 1, -1))
        return cols.view(self.grid, self.image_size).T.contiguous()

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, G, G) grids -> (B, 1, H, W) masks, float32."""
        op = self.operator.float()  # float32 even if the module was cast
        # A strided grid (a Beta's sample is a view of its Dirichlet's) makes the batched product copy it piecewise:
        # 78 us instead of 21 for the demo's 32 grids of 8 x 8 on one core; one copy first costs 2.
        return (op @ grid.float().contiguous() @ op.T).unsqueeze(1)

    def apply(self, images: torch.Tensor, grid: torch.Tensor, styled: torch.Tensor | None = None) -> torch.Tensor:
        """Multiply normalised images (B, C, H, W) by the blurred mask of each image's grid or, given ``styled`` (their
        restyled copies, :func:`random_style`), blend the two under it: ``M * images + (1 - M) * styled``."""
        mask = self(grid).to(images.dtype)
        return images * mask if styled is None else torch.lerp(styled, images, mask)
