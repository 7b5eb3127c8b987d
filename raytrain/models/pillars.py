"""A small pillar network that maps a LiDAR sweep to one unit-norm feature per point (the UP-VL student's point head).

Points are scattered into BEV pillars (max-pooled point MLP features), a small U-Net-style BEV CNN gives each pillar
metres of context, and the point head concatenates each point's own feature with its pillar's BEV feature and maps
them to D dimensions, L2-normalised. Distilled from the VLM's per-point features, the output lives in the VLM's
embedding space, so text embeddings query it by cosine similarity with LiDAR alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PillarNetConfig:
    name: str = "pillar_student"
    out_dim: int = 64  # the VLM feature dimension
    point_dim: int = 32
    width: int = 48
    cell: float = 0.4  # m, pillar side
    x_range: tuple[float, float] = (-48.0, 48.0)  # m, vehicle frame
    y_range: tuple[float, float] = (-24.0, 24.0)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows along x, columns along y), divisible by 4 for the two stride-2 stages."""
        nx = round((self.x_range[1] - self.x_range[0]) / self.cell)
        ny = round((self.y_range[1] - self.y_range[0]) / self.cell)
        return nx - nx % 4, ny - ny % 4


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PillarNet(nn.Module):
    def __init__(self, cfg: PillarNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.point_mlp = nn.Sequential(nn.Linear(5, cfg.point_dim), nn.ReLU(), nn.Linear(cfg.point_dim, cfg.point_dim))
        self.down0 = nn.Sequential(_block(cfg.point_dim, w), _block(w, w))
        self.down1 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))
        self.down2 = nn.Sequential(_block(2 * w, 2 * w, 2), _block(2 * w, 2 * w))
        self.fuse = _block(5 * w, w)
        self.head = nn.Sequential(nn.Linear(w + cfg.point_dim, w), nn.ReLU(), nn.Linear(w, cfg.out_dim))

    def pillar_index(self, xyz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat pillar index (N,), in-grid mask (N,)) of vehicle-frame points."""
        cfg, (nx, ny) = self.cfg, self.cfg.grid
        ix = torch.floor((xyz[:, 0] - cfg.x_range[0]) / cfg.cell).long()
        iy = torch.floor((xyz[:, 1] - cfg.y_range[0]) / cfg.cell).long()
        inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        return ix.clamp(0, nx - 1) * ny + iy.clamp(0, ny - 1), inside

    def forward(self, xyz: torch.Tensor, height: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
        """xyz (N, 3) vehicle frame, height above ground (N,), intensity (N,) -> (N, out_dim) unit features.

        Points outside the grid get only their own point feature as context (their BEV feature is zero).
        """
        cfg, (nx, ny) = self.cfg, self.cfg.grid
        index, inside = self.pillar_index(xyz)
        centre_x = cfg.x_range[0] + (index // ny + 0.5) * cfg.cell
        centre_y = cfg.y_range[0] + (index % ny + 0.5) * cfg.cell
        local = torch.stack([(xyz[:, 0] - centre_x) / cfg.cell, (xyz[:, 1] - centre_y) / cfg.cell, height,
                             intensity, xyz[:, :2].norm(dim=1) / 50.0], dim=1)
        p = self.point_mlp(local)  # (N, P)
        rows = index[inside, None].expand(-1, p.shape[1])
        bev = p.new_zeros(nx * ny, p.shape[1]).scatter_reduce(0, rows, p[inside], "amax", include_self=False)
        bev = bev.T.reshape(1, -1, nx, ny)  # (1, P, nx, ny); empty pillars stay 0
        x0 = self.down0(bev)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        up = [x0, F.interpolate(x1, size=(nx, ny), mode="nearest"), F.interpolate(x2, size=(nx, ny), mode="nearest")]
        grid = self.fuse(torch.cat(up, 1))[0].reshape(cfg.width, -1).T  # (nx*ny, W)
        context = grid[index] * inside[:, None]
        return F.normalize(self.head(torch.cat([context, p], 1)), dim=1)


def build_pillarnet(cfg: PillarNetConfig, device: torch.device | str | None = None) -> PillarNet:
    return PillarNet(cfg).to(device) if device is not None else PillarNet(cfg)
