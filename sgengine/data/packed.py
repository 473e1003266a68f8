"""Open a pack memory-mapped: no rank reads more of it than the rows it gathers.

``open_pack`` checks the pack against what the model takes (size, channels; for latents the
VAE's channel count and the latent grid) and returns ImageData whose ``images`` is an NCHW view
of the mapped NHWC rows: indexing a batch reads just those rows from the page cache, which every
process on a node shares (one copy, however many ranks). A posterior latent pack is checked
against the C channels the model sees (it stores 2C: mean, std); ``images`` views the mean and
``moments`` all 2C, which the loader gathers and draws from.
"""
from __future__ import annotations

import torch

from .images import ImageData
from .store import is_pack, open_rows, posterior_kind, read_labels, read_manifest, read_names

__all__ = ["is_pack", "open_pack", "check_shape"]


def check_shape(path, man: dict, size: int | None, channels: int | None) -> None:
    """One-line errors for a pack of another size or channel count, naming the file and the fix."""
    got_size, got_ch = man["size"], man["channels"]
    if man.get("kind") == "latents":
        vae = man.get("vae", {}).get("path", "?")
        if channels is not None and got_ch != channels:
            raise ValueError(f"{path} holds {got_ch}-channel latents (VAE {vae}) but the model takes {channels} "
                             f"channels: set the model's in_channels to {got_ch}, or encode with a VAE of "
                             f"{channels} latent channels")
        if size is not None and got_size != size:
            raise ValueError(f"{path} holds {got_size}x{got_size} latents but the model takes {size}x{size}: set the "
                             f"model's img_size to {got_size}, or encode a pack of {size * man['factor']}-px images")
        return
    if size is not None and got_size != size:
        raise ValueError(f"{path} is a pack at {got_size} px but the model takes {size} px: pack the source at {size} "
                         f"(python -m sgengine.data pack {man['source']} OUT --size {size}) or set the model's img_size")
    if channels is not None and got_ch != channels:
        raise ValueError(f"{path} holds {got_ch}-channel images but the model takes {channels}: pack with "
                         f"--channels {channels}, or set the model's in_channels to {got_ch}")


def open_pack(path, size: int | None = None, channels: int | None = None, names: bool = True) -> ImageData:
    """A complete pack as ImageData over the memory map (see the module doc)."""
    man = read_manifest(path)
    check_shape(path, man, size, channels)
    rows = torch.from_numpy(open_rows(path, man)).permute(0, 3, 1, 2)
    moments = rows if posterior_kind(man) == "mean_std" else None  # images: a view of the mean channels
    labels = read_labels(path, man)
    stats = man["stats"] if man["dtype"] != "uint8" else None
    return ImageData(rows if moments is None else rows[:, :man["channels"]],
                     None if labels is None else torch.from_numpy(labels), read_names(path) if names else [],
                     [tuple(s) for s in man["skipped"]], man, stats, moments)
