"""Tiles of a high-resolution frame: where they lie, cutting them out, and stitching their maps back.

The network sees TxT tiles of the resized frame (`--tile`, `--tile_stride`); the anomaly map of
the frame is put back together from the tiles' maps, averaged where tiles overlap. Every entry
point goes through this one geometry (Preprocess.tiles, and the Detector's tile step).
"""
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

    @cached_property
    def _coverage(self):
        """How many tiles cover each pixel of the frame (float32 [H, W])."""
        cover = np.zeros(self.frame, np.float32)
        for y, x in self.origins:
            cover[y:y + self.tile, x:x + self.tile] += 1
        return cover

    def split(self, frames):
        """[B, C, H, W] frames -> [B * count, C, T, T] tiles, image by image."""
        t = self.tile
        tiles = [frames[:, :, y:y + t, x:x + t] for y, x in self.origins]
        return np.ascontiguousarray(np.stack(tiles, axis=1).reshape(-1, frames.shape[1], t, t))

    def stitch(self, tile_maps):
        """[B * count, T, T] maps of `split`'s tiles -> [B, H, W], the mean of the tiles over each pixel."""
        t, n = self.tile, self.count
        grouped = np.asarray(tile_maps, np.float32).reshape(-1, n, t, t)
        out = np.zeros((len(grouped), *self.frame), np.float32)
        for i, (y, x) in enumerate(self.origins):
            out[:, y:y + t, x:x + t] += grouped[:, i]
        return out / self._coverage
