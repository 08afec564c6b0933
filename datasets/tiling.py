"""Tiles of a high-resolution frame: where they lie, cutting them out, and stitching their maps back.

The network sees TxT tiles of the resized frame (`--tile`, `--tile_stride`); the anomaly map of
the frame is put back together from the tiles' maps, averaged where tiles overlap. Every entry
point goes through this one geometry (Preprocess.tiles, and the Detector's tile step).
"""
import functools
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def tile_origins(length, tile, stride):
    """Start of each tile along one side: every `stride` pixels, plus one flush with the far edge
    when the stride does not land there, so that the tiles always cover the whole side."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """`frame` (H, W) cut into `tile` x `tile` squares every `stride` pixels, row by row."""
    frame: tuple
    tile: int
    stride: int

    @cached_property
    def origins(self):
        """[(top, left)] of each tile, in the order tiles are fed to the network."""
        h, w = self.frame
        return [(y, x) for y in tile_origins(h, self.tile, self.stride) for x in tile_origins(w, self.tile, self.stride)]

    @property
    def count(self):
        return len(self.origins)

    @functools.lru_cache(maxsize=4)
    def _weights(self, border):
        """(weight of each tile's pixels [count, T, T], their sum over the frame [H, W]). A pixel
        within `border` of a tile's edge counts only where no tile has it inside that margin
        (the frame's own edges, or tiles overlapping by less than twice the margin)."""
        t = self.tile
        inner = np.zeros((t, t), np.float32)
        inner[border:t - border, border:t - border] = 1.0
        inside = np.zeros(self.frame, np.float32)
        for y, x in self.origins:
            inside[y:y + t, x:x + t] += inner
        weights = np.stack([np.where(inside[y:y + t, x:x + t] > 0, inner, np.float32(1.0)) for y, x in self.origins])
        total = np.zeros(self.frame, np.float32)
        for (y, x), w in zip(self.origins, weights):
            total[y:y + t, x:x + t] += w
        return weights, total

    def split(self, frames):
        """[B, C, H, W] frames -> [B * count, C, T, T] tiles, image by image."""
        t = self.tile
        tiles = [frames[:, :, y:y + t, x:x + t] for y, x in self.origins]
        return np.ascontiguousarray(np.stack(tiles, axis=1).reshape(-1, frames.shape[1], t, t))

    def stitch(self, tile_maps, border=0):
        """[B * count, T, T] maps of `split`'s tiles -> [B, H, W], the mean of the tiles over each
        pixel. `border`: pixels along a tile's edges that the method does not score (EfficientAD: its
        16 unscored pixels and the 2 the upsampling mixes with them); they are left out of the mean
        wherever another tile scores the pixel."""
        t, n = self.tile, self.count
        weights, total = self._weights(int(border))
        grouped = np.asarray(tile_maps, np.float32).reshape(-1, n, t, t)
        out = np.zeros((len(grouped), *self.frame), np.float32)
        for i, (y, x) in enumerate(self.origins):
            out[:, y:y + t, x:x + t] += grouped[:, i] * weights[i] if border else grouped[:, i]
        return out / total
