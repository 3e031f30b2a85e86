"""The paper's augmentation as one batch transform on plain tensors, for images held decoded (`kd_lib.data.resident`).

fastai v1's `get_transforms(do_flip=False)`, the paper's, is fastai's `aug_transforms(**PAPER_AUG)` today: per
image, with probability `p_affine` each, a rotation of up to `max_rotate` degrees, a zoom of up to `max_zoom`
about a random centre and a perspective warp of up to `max_warp`, sampled once (bilinear, reflection padding);
then, with probability `p_lighting` each, a brightness and a contrast change of up to `max_lighting`, in logit
space. `PaperAugment` draws the same distributions and applies the same maps as fastai's transforms (the affine
matrix rotation @ zoom, fastai's perspective coefficients, `grid_sample` with `align_corners=True`), in a handful
of batched tensor operations: fastai's own run several hundred small operations per batch through its tensor
types, which on a CPU costs more than a small model's training step. The random draws come in another order, so
the augmented images are the same family, not the same pixels.
"""
import math

import torch
import torch.nn.functional as F
from fastai.torch_core import TensorImage
from fastai.vision.augment import RandTransform

__all__ = ["PAPER_AUG", "PaperAugment"]

PAPER_AUG = dict(do_flip=False, max_rotate=10, max_zoom=1.1, max_lighting=0.2, max_warp=0.2,
                 p_affine=0.75, p_lighting=0.75)  # fastai v1 get_transforms(do_flip=False)


def _masked(draw: torch.Tensor, p: float, neutral: float) -> torch.Tensor:
    "`draw` where a Bernoulli(`p`) says so, else `neutral` (fastai's `mask_tensor`)."
    keep = torch.rand_like(draw) < p
    return torch.where(keep, draw, torch.full_like(draw, neutral))


def _perspective(n: int, x_t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    "fastai's warp coefficients (8 per image) mapping the corners of [-1, 1]^2 to the warped ones."
    corners = [[-1., -1.], [-1., 1.], [1., -1.], [1., 1.]]
    orig = torch.tensor(corners, dtype=x_t.dtype, device=x_t.device).expand(n, 4, 2)
    targ = torch.stack([torch.stack([-1 - y_t, -1 - x_t], 1), torch.stack([-1 + y_t, 1 + x_t], 1),
                        torch.stack([1 + y_t, -1 + x_t], 1), torch.stack([1 - y_t, 1 - x_t], 1)], 1)
    one, zero = torch.ones(n, dtype=x_t.dtype, device=x_t.device), torch.zeros(n, dtype=x_t.dtype, device=x_t.device)
    rows = []
    for i in range(4):  # the equations fastai's find_coeffs solves, from the original points to the target ones
        px, py, qx, qy = orig[:, i, 0], orig[:, i, 1], targ[:, i, 0], targ[:, i, 1]
        rows += [torch.stack([qx, qy, one, zero, zero, zero, -px * qx, -px * qy], 1),
                 torch.stack([zero, zero, zero, qx, qy, one, -py * qx, -py * qy], 1)]
    return torch.linalg.solve(torch.stack(rows, 1), orig.reshape(n, 8, 1))[..., 0]


class PaperAugment(RandTransform):
    "The paper's augmentation (`PAPER_AUG`) on a batch of float images in [0, 1], on the training split only."
    split_idx, order = 0, 30  # with fastai's affine transforms: after IntToFloatTensor (10), before Normalize (99)

    def __init__(self, max_rotate=10., max_zoom=1.1, max_warp=0.2, max_lighting=0.2, p_affine=0.75, p_lighting=0.75,
                 **kwargs):
        super().__init__(p=1.)
        self.max_rotate, self.max_zoom, self.max_warp, self.max_lighting = max_rotate, max_zoom, max_warp, max_lighting
        self.p_affine, self.p_lighting = p_affine, p_lighting

    def encodes(self, x: TensorImage):
        t = x.as_subclass(torch.Tensor)
        n, dev, dt = t.shape[0], t.device, t.dtype
        u = lambda lo, hi: torch.empty(n, device=dev, dtype=dt).uniform_(lo, hi)  # noqa: E731
        theta = _masked(u(-self.max_rotate, self.max_rotate), self.p_affine, 0.) * math.pi / 180
        s = 1 / _masked(u(1., self.max_zoom), self.p_affine, 1.)
        col, row = (1 - s) * (2 * u(0., 1.) - 1), (1 - s) * (2 * u(0., 1.) - 1)
        cos, sin = theta.cos(), theta.sin()
        mat = torch.stack([torch.stack([cos * s, sin * s, cos * col + sin * row], 1),  # rotation @ zoom
                           torch.stack([-sin * s, cos * s, -sin * col + cos * row], 1)], 1)
        h, w = t.shape[-2:]
        mat[:, 0, 1] *= h / w
        mat[:, 1, 0] *= w / h
        grid = F.affine_grid(mat, list(t.shape), align_corners=True)
        c = _perspective(n, _masked(u(-self.max_warp, self.max_warp), self.p_affine, 0.),
                         _masked(u(-self.max_warp, self.max_warp), self.p_affine, 0.))
        coeffs = torch.cat([c, torch.ones(n, 1, device=dev, dtype=dt)], 1).view(n, 3, 3)
        flat = grid.reshape(n, -1, 2)
        warped = flat @ coeffs[..., :2].transpose(1, 2) + coeffs[..., 2].unsqueeze(1)
        if not (warped[..., 2] == 0).any(): flat = warped[..., :2] / warped[..., 2:]
        t = F.grid_sample(t, flat.view_as(grid), mode="bilinear", padding_mode="reflection", align_corners=True)
        ml = self.max_lighting
        bright = _masked(u(0.5 * (1 - ml), 0.5 * (1 + ml)), self.p_lighting, 0.5)
        contrast = _masked(u(math.log(1 - ml), -math.log(1 - ml)).exp(), self.p_lighting, 1.)
        t = t.clamp(1e-7, 1 - 1e-7)
        logits = (-(1 / t - 1).log() + torch.logit(bright)[:, None, None, None]) * contrast[:, None, None, None]
        return TensorImage(torch.sigmoid(logits))
