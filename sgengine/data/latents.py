"""Latent diffusion: encode a pack with a diffusers AutoencoderKL, decode samples back to pixels.

``encode`` turns an image pack (uint8, N x S x S x 3) into a latent pack (float16, f = 2^(levels-1),
8 and C = 4 for the SD VAE) that keeps the VAE's posterior q(z|x) = N(mean, std^2): rows of
N x S/f x S/f x 2C, C channels of scaling_factor * mean then C of scaling_factor * std, and the
trainer draws z = mean + std * eps afresh every batch. That is what the reference trainers train
on: U-ViT's ``extract_imagenet_feature.py`` stores the posterior moments and ``train_ldm.py``
draws ``autoencoder.sample(moments)`` per batch; LDM's ``get_first_stage_encoding`` samples the
posterior; EDM2 stores mean and std and draws mean + std * randn per batch. ``posterior='mean'``
keeps only the mean (the older packs: the model then always sees the same latent of an image).
Encoding itself is deterministic (the draw happens at training time), so a resumed encode is
bit-identical. It runs batched, on the GPU when there is one, and resumes like a pack
(store.Progress). The manifest names the VAE and its scaling factor, so sampling decodes with the
same one: ``to_images(x, data)`` is the one hook samplers call to turn samples into uint8 pixels.
SAG works on latents unchanged: its blur is the latent models' kernel 9, sigma 1 (SPEC section 4),
the sampler's default, and its mask is upsampled to the latent grid.
"""
from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..common.paths import check_writable
from .checks import stats_from_sums
from .images import to_uint8
from .store import (DATA, LABELS, MANIFEST, NAMES, POSTERIORS, Progress, RowWriter, is_pack, open_rows,
                    posterior_kind, read_manifest, write_pack)

VAE_HINT = ("pass a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors, e.g. "
            "stabilityai/sd-vae-ft-ema), or a weights file with a config.json beside it")


def load_vae(path, device="cpu"):
    """A diffusers AutoencoderKL from a local folder, or a weights file (with config.json beside it,
    else diffusers' single-file loader); eval mode, no gradients."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no VAE at {path}: {VAE_HINT}")
    try:
        vae = AutoencoderKL.from_pretrained(path) if path.is_dir() else _from_file(AutoencoderKL, path)
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as err:
        raise ValueError(f"cannot load a VAE from {path} ({type(err).__name__}: {str(err)[:200]}): {VAE_HINT}") from err
    return vae.to(device).eval().requires_grad_(False)


def _from_file(cls, path: Path):
    if not (path.parent / "config.json").is_file():  # an original (LDM-layout) checkpoint
        return cls.from_single_file(str(path), local_files_only=True)
    vae = cls.from_config(json.loads((path.parent / "config.json").read_text()))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    vae.load_state_dict(state)  # strict: a file of another VAE fails here
    return vae


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_identity(vae, path, scaling: float) -> dict:
    return {"path": str(Path(path).resolve()), "scaling_factor": scaling, "latent_channels": vae.config.latent_channels,
            "in_channels": vae.config.in_channels, "factor": vae_factor(vae)}


def _check_source(pack: Path, man: dict, vae, path) -> int:
    """The latent grid size, after checking the pack is an image pack the VAE can take."""
    if man.get("kind") != "images":
        raise ValueError(f"{pack} holds {man.get('kind')}, not images: encode an image pack (python -m sgengine.data pack)")
    if man["channels"] != vae.config.in_channels:
        raise ValueError(f"{pack} holds {man['channels']}-channel images but the VAE {path} takes "
                         f"{vae.config.in_channels}: pack with --channels {vae.config.in_channels}")
    f = vae_factor(vae)
    if man["size"] % f:
        raise ValueError(f"{pack} is at {man['size']} px, not a multiple of the VAE's factor {f}: "
                         f"pack at {man['size'] // f * f or f} px")
    return man["size"] // f


def encode(pack, out, vae_path, batch_size: int = 32, device=None, scaling: float | None = None,
           log=print, progress: bool = True, posterior: str = "mean_std") -> dict:
    """Encode the image pack ``pack`` into the latent pack ``out``; returns its manifest.
    ``posterior``: 'mean_std' (mean and std of q(z|x), sampled per batch) or 'mean' (mean only)."""
    from ..device import resolve_device

    pack, out = Path(pack), check_writable(out, "OUT", "choose another OUT")
    man = read_manifest(pack)
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if posterior not in POSTERIORS:
        raise ValueError(f"--posterior must be one of {sorted(POSTERIORS)}, got {posterior!r}")
    vae = load_vae(vae_path, resolve_device(device or "auto"))
    scaling = float(vae.config.scaling_factor if scaling is None else scaling)
    side = _check_source(pack, man, vae, vae_path)
    header = {"format": "encode", "source": str(pack.resolve()), "vae": vae_identity(vae, vae_path, scaling),
              "chunk": batch_size, "items": man["count"]}
    if posterior != "mean":  # unnamed when 'mean': an unfinished encode of an older version still resumes
        header["posterior"] = posterior
    if (out / MANIFEST).is_file():
        return _complete(out, posterior, log)
    out.mkdir(parents=True, exist_ok=True)
    t0, prog = time.perf_counter(), Progress(out, header)
    c = vae.config.latent_channels
    _encode_rows(open_rows(pack, man), vae, scaling, out, prog, (side, side, c * POSTERIORS[posterior]),
                 batch_size, progress)
    result = _finish(pack, out, man, prog, header, side)
    log(f"encoded {result['count']} images into {side}x{side}x{result['channels']} latents in {out} "
        f"in {time.perf_counter() - t0:.1f} s")
    return result


def _complete(out: Path, posterior: str, log) -> dict:
    """The manifest of an already complete latent pack ``out``, if it holds the posterior asked for."""
    man = read_manifest(out)
    if posterior_kind(man) != posterior:
        raise ValueError(f"{out} already holds a complete latent pack with posterior {posterior_kind(man)!r}, not "
                         f"{posterior!r}: choose another OUT")
    log(f"{out} is already a complete latent pack; nothing to do")
    return man


@torch.inference_mode()
def _encode_rows(rows, vae, scaling, out, prog, shape, batch, progress) -> None:
    from tqdm.auto import tqdm

    dev, n = next(vae.parameters()).device, len(rows)
    starts = list(range(0, n, batch))
    writer = RowWriter(out / DATA, n, shape, np.float16)
    for i in tqdm(range(len(prog.entries), len(starts)), desc="encode", disable=not progress):
        a = starts[i]
        x = torch.from_numpy(np.ascontiguousarray(rows[a:a + batch])).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = posterior_rows(vae, x, scaling, shape[-1] > vae.config.latent_channels)
        check_rows(z, a, vae.config.latent_channels)
        writer.write(a, z)
        flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
        prog.record({"task": i, "cursor": a + len(z), "sum": flat.sum(0).tolist(), "sq": (flat * flat).sum(0).tolist()})
    writer.finish(n)


def posterior_rows(vae, x: torch.Tensor, scaling: float, with_std: bool) -> np.ndarray:
    """Float16 NHWC rows of images x: scaling * mean of q(z|x), then (``with_std``) scaling * its
    std (diffusers' ``DiagonalGaussianDistribution.std`` = exp(logvar / 2))."""
    dist = vae.encode(x).latent_dist
    parts = [dist.mean, dist.std] if with_std else [dist.mean]
    return (torch.cat(parts, 1) * scaling).permute(0, 2, 3, 1).half().cpu().numpy()


def check_rows(z: np.ndarray, first: int, c: int) -> None:
    """Refuse non-finite latents and negative std (channels c: of posterior rows) in one line."""
    rows = f"rows {first}..{first + len(z) - 1}"
    if not np.isfinite(z).all():
        raise FloatingPointError(f"the VAE gave non-finite latents (mean or std) for {rows}: check the VAE "
                                 "weights (a float16 VAE overflowing? use its float32 weights)")
    if (z[..., c:] < 0).any():
        raise FloatingPointError(f"the VAE gave a negative posterior std for {rows}: its latent_dist is not a "
                                 "diagonal Gaussian's (mean, std); check the VAE, or encode with --posterior mean")


def latent_stats(s, sq, n: int, c: int) -> dict:
    """Per-channel mean / std of the latent the model trains on, from the stored rows' sums. For
    posterior rows z = mean + std * eps: E[z] = E[mean], Var[z] = Var[mean] + E[std^2] (the law
    of total variance), i.e. sums of squares of mean and std added."""
    s, sq = np.asarray(s, np.float64), np.asarray(sq, np.float64)
    return stats_from_sums(s[:c], sq[:c] + sq[c:] if len(sq) > c else sq, n, np.float16)


def _finish(pack: Path, out: Path, man: dict, prog: Progress, header: dict, side: int) -> dict:
    vae, post = header["vae"], header.get("posterior", "mean")
    s, sq = np.sum([e["sum"] for e in prog.entries], 0), np.sum([e["sq"] for e in prog.entries], 0)
    labels = np.load(pack / LABELS) if man.get("labels") else None
    names = (pack / NAMES).read_text().splitlines()
    c, n = vae["latent_channels"], man["count"]
    latent = {"kind": "latents", "source": header["source"], "source_kind": "pack", "size": side, "channels": c,
              "posterior": post, "count": n, "dtype": "float16",
              "bytes": n * side * side * c * POSTERIORS[post] * 2, "factor": vae["factor"], "vae": vae,
              "classes": man.get("classes", []), "skipped": [], "stats": latent_stats(s, sq, n * side * side, c)}
    return write_pack(out, latent, names, labels)


# -------------------------------------------------------------------------------------- decoding

def latent_manifest(data) -> dict | None:
    """The manifest when ``data`` (a --data spec) is a latent pack, else None."""
    if not isinstance(data, (str, Path)) or not is_pack(data):
        return None
    man = read_manifest(data)
    return man if man.get("kind") == "latents" else None


@lru_cache(maxsize=2)
def _cached_vae(path: str, device: str):
    return load_vae(path, device)


@torch.inference_mode()
def decode(z: torch.Tensor, vae_info: dict, batch: int = 16) -> torch.Tensor:
    """Latents (N, C, h, w) -> uint8 pixels (N, 3, h f, w f) with the VAE of ``vae_info``."""
    vae = _cached_vae(vae_info["path"], str(z.device))
    if z.shape[1] != vae.config.latent_channels:
        raise ValueError(f"samples have {z.shape[1]} channels but the VAE {vae_info['path']} decodes "
                         f"{vae.config.latent_channels}-channel latents: decode with the VAE the pack was encoded with")
    parts = [vae.decode(z[a:a + batch].float() / vae_info["scaling_factor"]).sample for a in range(0, len(z), batch)]
    return to_uint8(torch.cat(parts).cpu())


def to_images(x: torch.Tensor, data) -> torch.Tensor:
    """Samples -> uint8 pixels: decoded with the pack's VAE when ``data`` is a latent pack."""
    man = latent_manifest(data)
    return to_uint8(x.cpu()) if man is None else decode(x, man["vae"])
