"""``python -m sgengine.sample``: draw samples from a trained checkpoint's EMA weights.

Writes a PNG grid (one row per cluster) and the raw samples (uint8 images and their
cluster ids) to an .npz beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .data import read_image
from .data.latents import to_images
from .device import resolve_device
from .guidance.attach import list_attention_layers
from .sampling import grid_clusters, load_generator, sample
from .training.checkpoint import load_meta, resolve_checkpoint
from .viz import save_grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sgengine.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run folder (--out of sgengine.train) or ckpt/step_* folder")
    p.add_argument("--n", type=int, default=64, help="number of samples (spread over the clusters' rows)")
    p.add_argument("--w", type=float, default=2.0, help="CFG scale: eps_u + w (eps_c - eps_u); 0 = unconditional")
    p.add_argument("--clusters", type=int, nargs="*", default=None,
                   help="cluster ids, one grid row each; default: drawn from the training frequencies")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default=None,
                   help="ddim|ddpm (ddpm objective), heun|euler (edm), euler|heun|dopri5 (flow); default per objective")
    p.add_argument("--prototypes", type=int, nargs="*", default=None,
                   help="online self-guidance runs: prototype ids, one grid row each (default: the most used)")
    p.add_argument("--like", default=None, help="online runs: condition on the prototype of this exemplar image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples.png", help="PNG grid; the raw samples go to the same name .npz")
    g = p.add_argument_group("self-attention guidance (Hong et al.; SPEC section 4)")
    g.add_argument("--sag-scale", type=float, default=0.0, help="SAG scale s (0 = off; ~0.1-1.0)")
    g.add_argument("--sag-layer", default=None, help="attention layer to read (default: mid-block); see --list-layers")
    g.add_argument("--sag-threshold", type=float, default=1.0, help="mask = attention mass > threshold")
    g.add_argument("--sag-blur", type=_pair(int, float), default=(9, 1.0), metavar="K,SIGMA",
                   help="Gaussian blur kernel size (odd) and sigma, e.g. 9,1.0")
    g.add_argument("--sag-window", type=_pair(float, float), default=None, metavar="LO,HI",
                   help="apply SAG only for LO <= t <= HI in the sampler's time (timestep / sigma / flow t)")
    g.add_argument("--list-layers", action="store_true", help="print the checkpoint's attention layers and exit")
    return p


def _pair(first, second):
    """argparse type for 'A,B' -> (first(A), second(B))."""
    def parse(text: str):
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected two comma-separated values like 9,1.0, got {text!r}")
        try:
            return first(parts[0]), second(parts[1])
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return parse


def _rows(gen, args) -> tuple[torch.Tensor | None, int]:
    """Cluster id per sample and the number of grid rows."""
    if not gen.k:
        return None, max(1, int(args.n ** 0.5))
    clusters = args.clusters if args.clusters else grid_clusters(gen, min(gen.k, 8))
    per_row = max(1, args.n // len(clusters))
    return torch.tensor(clusters).repeat_interleave(per_row), len(clusters)


def _online(args, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Samples of an online self-guidance run, by prototype id or by an exemplar's prototype."""
    from .online.trainer import load_online, prototype_of_exemplar, sample_prototypes, top_prototypes

    gen = load_online(args.ckpt, device)
    if args.like:
        m = gen.gen.cfg.uvit
        pid = prototype_of_exemplar(gen, torch.from_numpy(read_image(Path(args.like), m.img_size, m.in_channels)),
                                    seed=args.seed)
        print(f"exemplar {args.like}: prototype {pid if isinstance(pid, int) else pid.tolist()}")
        protos = [pid] if isinstance(pid, int) else None
        ids = torch.tensor(protos).repeat(args.n) if protos else pid[None].expand(args.n, -1)
        return sample_prototypes(gen, ids, args.w, args.steps, args.sampler, args.seed, True), ids, 1
    rows = args.prototypes or top_prototypes(gen, 8)
    ids = torch.tensor(rows).repeat_interleave(max(1, args.n // len(rows)))
    return sample_prototypes(gen, ids, args.w, args.steps, args.sampler, args.seed, True), ids, len(rows)


def gen_cfg_data(path) -> str:
    """The --data of the run at ``path`` (a latent pack: its samples are decoded with the pack's VAE)."""
    return load_meta(resolve_checkpoint(path))["config"].get("data", "")


def _is_online(path) -> bool:
    return bool(load_meta(resolve_checkpoint(path))["config"].get("online", {}).get("enabled"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    try:
        if _is_online(args.ckpt) and not args.list_layers:
            x, ids, rows = _online(args, device)
            return _write(to_images(x, gen_cfg_data(args.ckpt)), ids, rows, args.out)
        if args.like or args.prototypes:
            raise ValueError("--like and --prototypes need an online self-guidance run (--preset uvit-*-online)")
        gen = load_generator(args.ckpt, device)
        if args.list_layers:
            print("\n".join(list_attention_layers(gen.net)))
            return 0
        ids, rows = _rows(gen, args)
        x = sample(gen, ids, args.n if ids is None else len(ids), w=args.w, steps=args.steps,
                   sampler=args.sampler, seed=args.seed, progress=True, sag_scale=args.sag_scale,
                   sag_layer=args.sag_layer, sag_threshold=args.sag_threshold, sag_blur=args.sag_blur,
                   sag_window=args.sag_window)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _write(to_images(x, gen.cfg.data), ids, rows, args.out)


def _write(x: torch.Tensor, ids: torch.Tensor | None, rows: int, out: str) -> int:
    imgs = x.cpu()  # uint8: to_images decoded latents, or scaled pixels
    out = Path(out)
    save_grid(imgs, rows, out, scale=2)
    np.savez(out.with_suffix(".npz"), images=imgs.numpy(), clusters=(ids.numpy() if ids is not None else np.array([])))
    print(f"wrote {out} ({len(imgs)} samples, {rows} rows) and {out.with_suffix('.npz')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
