"""``python -m sgengine.sample``: draw samples from a trained checkpoint's EMA weights.

Writes a PNG grid (one row per cluster) and the raw samples (uint8 images and their
cluster ids) to an .npz beside it.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .data import read_image
from .data.sources import READ_ERRORS
from .data.latents import to_images
from .device import device_flag, resolve_device
from .guidance.attach import list_attention_layers
from .sampling import generator_at, grid_clusters, sample
from .checkpoint import load_meta, resolve_checkpoint
from .common.flags import Count, FlagParser, NonNeg, NonNegInt, add_typed, error_line, run_cli
from .common.io import DiskFull, atomic_write
from .common.paths import check_writable
from .diffusion.samplers import SAMPLERS
from .viz import save_grid


def build_parser() -> FlagParser:
    p = FlagParser(prog="python -m sgengine.sample", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run folder (--out of sgengine.train) or ckpt/step_* folder")
    add_typed(p, "--n", Count, default=64, help="number of samples (spread over the clusters' rows)")
    add_typed(p, "--w", NonNeg, default=2.0, help="CFG scale: eps_u + w (eps_c - eps_u); 0 = unconditional")
    add_typed(p, "--clusters", NonNegInt, nargs="*", default=None,
              help="cluster ids, one grid row each; default: drawn from the training frequencies")
    add_typed(p, "--steps", Count, default=50, help="sampler steps")
    add_typed(p, "--sampler", Literal[tuple(sorted(SAMPLERS))] | None, default=None,
              help="any sampler on every objective; default per objective (ddim / heun / euler)")
    add_typed(p, "--prototypes", NonNegInt, nargs="*", default=None,
              help="online self-guidance runs: prototype ids, one grid row each (default: the most used)")
    p.add_argument("--like", default=None, help="online runs: condition on the prototype of this exemplar image")
    add_typed(p, "--seed", int, default=0)
    p.add_argument("--device", default="auto", type=device_flag, help="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    p.add_argument("--out", default="samples.png", help="PNG grid; the raw samples go to the same name .npz")
    g = p.add_argument_group("self-attention guidance (Hong et al.; SPEC section 4)")
    add_typed(g, "--sag_scale", float, default=0.0, help="SAG scale s (0 = off; ~0.1-1.0)")
    g.add_argument("--sag_layer", default=None, help="attention layer to read (default: mid-block); see --list_layers")
    add_typed(g, "--sag_threshold", float, default=1.0, help="mask = attention mass > threshold")
    add_typed(g, "--sag_blur", tuple[int, float], default=(9, 1.0), metavar="K,SIGMA",
              help="Gaussian blur kernel size (odd) and sigma, e.g. 9,1.0")
    add_typed(g, "--sag_window", tuple[float, float], default=None, metavar="LO,HI",
              help="apply SAG only for LO <= t <= HI in the network's own time (timestep / sigma / flow t)")
    g.add_argument("--list_layers", action="store_true", help="print the checkpoint's attention layers and exit")
    return p


def _rows(gen, args) -> tuple[torch.Tensor | None, int]:
    """Cluster id per sample and the number of grid rows."""
    if not gen.k:
        return None, max(1, int(args.n ** 0.5))
    clusters = args.clusters if args.clusters else grid_clusters(gen, min(gen.k, 8))
    per_row = max(1, args.n // len(clusters))
    return torch.tensor(clusters).repeat_interleave(per_row), len(clusters)


def _online(args, ckpt: Path, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Samples of an online self-guidance run, by prototype id or by an exemplar's prototype."""
    from .online.trainer import online_at, prototype_of_exemplar, sample_prototypes, top_prototypes

    gen = online_at(ckpt, device)
    if args.like:
        m = gen.gen.cfg.uvit
        pid = prototype_of_exemplar(gen, torch.from_numpy(read_image(Path(args.like), m.img_size, m.in_channels)),
                                    seed=args.seed)
        print(f"exemplar {args.like}: prototype {pid if isinstance(pid, int) else pid.tolist()}")
        protos = [pid] if isinstance(pid, int) else None
        ids = torch.tensor(protos).repeat(args.n) if protos else pid[None].expand(args.n, -1)
        return sample_prototypes(gen, ids, args.w, args.steps, args.sampler, args.seed, True, **_sag(args)), ids, 1
    rows = args.prototypes or top_prototypes(gen, 8)
    ids = torch.tensor(rows).repeat_interleave(max(1, args.n // len(rows)))
    return sample_prototypes(gen, ids, args.w, args.steps, args.sampler, args.seed, True, **_sag(args)), ids, len(rows)


def _sag(args) -> dict:
    """The self-attention guidance options, the same for every kind of checkpoint."""
    return {"sag_scale": args.sag_scale, "sag_layer": args.sag_layer, "sag_threshold": args.sag_threshold,
            "sag_blur": args.sag_blur, "sag_window": args.sag_window}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # a bad flag (its one error line printed; 2) or --help (0)
        return stop.code
    try:
        device = resolve_device(args.device)
        check_args(args)
        ckpt = resolve_checkpoint(args.ckpt)  # checks every file's checksum: once, not per loader
        run = load_meta(ckpt)["config"]
        if run.get("online", {}).get("enabled") and not args.list_layers:
            if args.clusters:
                raise ValueError("--clusters names clusters of self-labels; an online run has prototypes: "
                                 "use --prototypes (or --like IMAGE)")
            x, ids, rows = _online(args, ckpt, device)
            # a latent pack's samples are decoded with the pack's VAE
            return _write(to_images(x, run.get("data", "")), ids, rows, args.out)
        if args.like or args.prototypes:
            raise ValueError("--like and --prototypes need an online self-guidance run (--preset uvit-*-online)")
        gen = generator_at(ckpt, device)
        if args.list_layers:
            print("\n".join(list_attention_layers(gen.net)))
            return 0
        check_model(gen, args)
        ids, rows = _rows(gen, args)
        x = sample(gen, ids, args.n if ids is None else len(ids), w=args.w, steps=args.steps,
                   sampler=args.sampler, seed=args.seed, progress=True, **_sag(args))
    except (OSError, ValueError, KeyError, TypeError) as err:
        hint = " (list them with --list_layers)" if isinstance(err, KeyError) else ""
        print(error_line(err) + hint, file=sys.stderr)
        return 2
    return _write(to_images(x, gen.cfg.data), ids, rows, args.out)


OUT_SUFFIXES = (".png",)  # the grid; the raw samples go beside it as .npz


def check_args(args) -> None:
    """The flags the parser cannot judge alone, checked before a checkpoint is loaded (one-line ValueErrors)."""
    _check_sag(args)  # --n and --steps >= 1 are the parser's
    if args.like is not None:
        _check_like(Path(args.like))
    rows = args.clusters or args.prototypes
    if rows and args.n < len(rows):
        flag = "--clusters" if args.clusters else "--prototypes"
        raise ValueError(f"--n {args.n} is fewer than the {len(rows)} {flag} (one grid row each, --n // rows "
                         f"samples a row): pass --n {len(rows)} or more, or fewer {flag}")
    if args.list_layers:
        return
    out = Path(args.out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"--out {out}: the sample grid is written as a PNG image, so --out must end in "
                         f"{' or '.join(OUT_SUFFIXES)} (allowed: {', '.join(OUT_SUFFIXES)}), e.g. --out {out.with_suffix('.png')}")
    for path, what in ((out, "--out"), (out.with_suffix(".npz"), "the raw samples' file")):
        check_writable(path, what, "choose another --out", folder=False)


def _check_like(path: Path) -> None:
    """--like is one readable image file, checked before the checkpoint is loaded."""
    fix = "pass one image file (.png, .jpg, ...)"
    if not path.exists():
        raise ValueError(f"--like {path} does not exist: {fix}")
    if not path.is_file():
        raise ValueError(f"--like {path} is a folder, not an image: {fix}")
    try:
        read_image(path, 8, 3)
    except READ_ERRORS as err:
        raise ValueError(f"--like {path} is not a readable image ({type(err).__name__}): {fix}") from None


def _check_sag(args) -> None:
    """SAG options do nothing without --sag_scale: a typo there must not pass unnoticed."""
    if args.sag_scale < 0:
        raise ValueError(f"--sag_scale must be >= 0 (0 = off), got {args.sag_scale}")
    defaults = build_parser()
    given = [f"--{dest}" for dest in ("sag_layer", "sag_threshold", "sag_blur", "sag_window")
             if getattr(args, dest) != defaults.get_default(dest)]
    if args.sag_scale == 0 and given:
        raise ValueError(f"{given[0]} has no effect without --sag_scale S (S > 0, e.g. 0.5): "
                         f"add --sag_scale, or drop {', '.join(given)}")


def check_model(gen, args) -> None:
    """The flags that depend on the checkpoint: --clusters of a conditional model, --sag_layer by name."""
    if args.clusters:
        if not gen.k:
            raise ValueError(f"--clusters needs a conditional model, but {args.ckpt} was trained unconditionally "
                             "(--condition none): drop --clusters")
        bad = [c for c in args.clusters if not 0 <= c < gen.k]
        if bad:
            raise ValueError(f"--clusters {bad[0]} is not a cluster of this model: ids lie in [0, {gen.k})")
    if args.sag_scale > 0 and args.sag_layer is not None:
        layers = list_attention_layers(gen.net)
        if args.sag_layer not in layers:
            raise ValueError(f"--sag_layer {args.sag_layer} is not an attention layer of this model; "
                             f"available: {', '.join(layers)}")


def _write(x: torch.Tensor, ids: torch.Tensor | None, rows: int, out: str) -> int:
    imgs = x.cpu()  # uint8: to_images decoded latents, or scaled pixels
    out, clusters = Path(out), ids.numpy() if ids is not None else np.array([])
    try:
        save_grid(imgs, rows, out, scale=2)
        atomic_write(out.with_suffix(".npz"), lambda tmp: _savez(tmp, images=imgs.numpy(), clusters=clusters))
    except DiskFull as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(imgs)} samples, {rows} rows) and {out.with_suffix('.npz')}")
    return 0


def _savez(path: Path, **arrays) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would add .npz to the temporary name
        np.savez(fh, **arrays)


class _CallableModule(types.ModuleType):
    """Importing this CLI module rebinds the package attribute ``sgengine.sample`` (the public function
    ``sgengine.sampling.sample``) to the module; calling the module keeps ``sg.sample(gen, ...)`` working."""

    def __call__(self, *args, **kwargs):
        return sample(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    run_cli(main)
