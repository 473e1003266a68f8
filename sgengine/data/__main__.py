"""``python -m sgengine.data``: pack a source once, or encode a pack into latents.

    python -m sgengine.data pack SRC OUT --size 64 --workers 8        # folder, npz batches or tar shards
    python -m sgengine.data encode OUT LATENTS --vae sd-vae-ft-ema    # 256-px pack -> 32x32x4 latents (mean, std)
    python -m sgengine.train --data LATENTS ...                        # trains on the memory map

Both resume when rerun with the same arguments after a kill.
"""
from __future__ import annotations

import argparse
import sys
from typing import Literal

from ..common.flags import Count, FlagParser, NonNegInt, Positive, add_typed, error_line, run_cli
from ..device import device_flag


def build_parser() -> FlagParser:
    p = FlagParser(prog="python -m sgengine.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="decode SRC in parallel into a memory-mappable pack OUT")
    pk.add_argument("src", help="image folder (recursive), .npz batch(es) (ImageNet32/64), or .tar shard(s)")
    pk.add_argument("out", help="pack folder to write (resumed when it holds an unfinished pack)")
    add_typed(pk, "--size", Count, required=True, help="side of the square images (ADM centre crop)")
    add_typed(pk, "--channels", Literal[1, 3], default=3, help="image channels")
    add_typed(pk, "--workers", NonNegInt, default=2, help="decoding processes (0 or 1: in this process)")
    add_typed(pk, "--chunk", Count, default=256, help="images per task (the unit of resumption)")
    pk.add_argument("--quiet", action="store_true")
    en = sub.add_parser("encode", help="encode an image pack into a latent pack with a diffusers AutoencoderKL")
    en.add_argument("pack", help="image pack (python -m sgengine.data pack)")
    en.add_argument("out", help="latent pack folder to write (resumed when unfinished)")
    en.add_argument("--vae", required=True, help="AutoencoderKL folder (config.json + weights) or weights file")
    add_typed(en, "--batch_size", Count, default=32, help="images per VAE forward")
    add_typed(en, "--scaling_factor", Positive | None, default=None, help="default: the VAE config's (SD: 0.18215)")
    add_typed(en, "--posterior", Literal["mean_std", "mean"], default="mean_std",
              help="mean_std: keep q(z|x)'s mean and std (training draws z = mean + std * eps each batch, as "
                   "U-ViT / LDM / EDM2); mean: the mean only (the model always sees one latent per image)")
    en.add_argument("--device", default="auto", type=device_flag)
    en.add_argument("--quiet", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pack":
            from .pack import pack
            pack(args.src, args.out, args.size, args.channels, args.workers, args.chunk, progress=not args.quiet)
        else:
            from .latents import encode
            encode(args.pack, args.out, args.vae, args.batch_size, args.device, args.scaling_factor,
                   progress=not args.quiet, posterior=args.posterior)
    except (ValueError, OSError, KeyError, RuntimeError, FloatingPointError, ImportError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_cli(main)
