"""``python -m sgengine.annotate``: write the annotation file that ``sgengine.train`` reads.

    python -m sgengine.annotate --data digits --size 16 --method labels --extractor pixels --k 10 \\
        --out runs/ann/digits.safetensors --inspect runs/ann/digits.png
    python -m sgengine.train --condition annotations --annotations runs/ann/digits.safetensors ...

Methods (SPEC section 1 and 3): labels (L2-normalised global features + k-means), temi (TEMI
clusters), boxes (self-labels + LOST box mask), segments (STEGO-style segment masks + multi-hot).
Extractors: pixels, pca, any timm ViT name (--weights FILE for a local checkpoint, --img_size for
its input size), diffusion:<run_dir> (--layer, --t). Features are cached (--cache).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Literal

import torch

from ..common.flags import Count, FlagParser, Fraction, Positive, add_typed, error_line, run_cli
from ..common.paths import check_writable
from ..data import ImageData, load_data, report_skipped
from ..device import device_flag, resolve_device
from ..eval.cluster import cluster_report, format_report
from .io import Annotations, save_annotations

METHODS = ("labels", "temi", "boxes", "segments")
NEEDS = {"labels": ("cls",), "temi": ("cls",), "boxes": ("cls", "keys"), "segments": ("cls", "patches")}


def build_parser() -> FlagParser:
    p = FlagParser(prog="python -m sgengine.annotate", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="'digits', an image folder, or an .npz/.npy file")
    add_typed(p, "--method", Literal[METHODS], default="labels", help="what to annotate (see above)")
    p.add_argument("--extractor", default="pixels",
                   help="pixels | pca | <timm ViT name, e.g. vit_small_patch16_224.dino> | diffusion:<run_dir>")
    p.add_argument("--weights", help="local ViT weights (.pth / .safetensors; timm or DINO layout), or "
                                     "'random' for a random init seeded by --seed (a baseline); without "
                                     "it the hub's pretrained weights are fetched (online only)")
    add_typed(p, "--img_size", Count | None, help="ViT input size (default: the model's own, e.g. 224)")
    p.add_argument("--layer", default="mid", help="diffusion block: index, 'mid' or module name")
    add_typed(p, "--t", float | None, help="diffusion noise level (ddpm timestep, flow time, edm sigma)")
    add_typed(p, "--pca_dim", Count, default=64, help="dimensions for --extractor pca")
    add_typed(p, "--patch", Count, default=4, help="pixel patch size of the pixels / pca extractor")
    add_typed(p, "--k", Count, required=True, help="number of clusters / segments")
    add_typed(p, "--size", Count, default=32, help="training resolution (layouts are stored at it)")
    add_typed(p, "--channels", Count, default=3, help="image channels when reading a folder")
    p.add_argument("--feature_data", help="images the extractor reads, at its own input size: the source folder "
                                          "or a pack at that size (e.g. 224); default: --data itself")
    p.add_argument("--out", required=True, help="annotation file to write (.safetensors)")
    p.add_argument("--inspect", help="also write a PNG of example images per cluster (rows = clusters)")
    p.add_argument("--labels_metrics", action="store_true",
                   help="require labels in the data (NMI / ARI / accuracy are printed whenever labels exist)")
    add_typed(p, "--epochs", Count, default=100, help="TEMI epochs")
    add_typed(p, "--temi_heads", Count, default=16, help="TEMI heads (the best one is used)")
    add_typed(p, "--temi_lr", Positive | None, default=None,
              help="TEMI learning rate per 256 samples (default: the paper's 5e-4 for runs of >= 20k "
                   "steps, stretched up to 25x on shorter runs: 1.25e-2 on digits' 800 steps)")
    add_typed(p, "--temi_momentum", Fraction | None, default=None,
              help="TEMI teacher EMA start (default: the paper's 0.996 for runs of >= 20k steps, "
                   "1 - 0.004 x 20k / steps on shorter ones, at least 0.9)")
    add_typed(p, "--steps", Count, default=2000, help="STEGO head training steps")
    p.add_argument("--crf", action="store_true",
                   help="refine --method segments per pixel with a dense CRF (STEGO's settings; exact, in PyTorch)")
    add_typed(p, "--crf_iters", Count, default=10, help="mean-field iterations of --crf")
    add_typed(p, "--lost_k", Count, default=100, help="LOST expansion set size")
    add_typed(p, "--batch_size", Count, default=64, help="feature extraction batch size")
    p.add_argument("--cache", default="auto", help="feature cache folder ('auto': next to --out; 'none': off)")
    p.add_argument("--device", default="auto", type=device_flag, help="'auto' (CUDA when present), 'cpu', 'cuda', ...")
    add_typed(p, "--seed", int, default=0,
              help="seeds k-means, TEMI, STEGO and a --weights random ViT (part of the feature-cache key)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _cache_dir(args) -> Path | None:
    if args.cache == "none":
        return None
    return Path(args.out).parent / "feature-cache" if args.cache == "auto" else Path(args.cache)


def features_for(args, data: ImageData, device: torch.device) -> tuple[dict, dict]:
    """(features dict, the extractor's settings) for the method's needs."""
    from .features import extract, make_extractor

    ext = make_extractor(args.extractor, args.weights, args.img_size, args.layer, args.t,
                         args.pca_dim, args.patch, device, seed=args.seed)
    missing = set(NEEDS[args.method]) - set(_provides(ext))
    if missing:
        raise ValueError(f"--method {args.method} needs {sorted(missing)} features, which --extractor "
                         f"{args.extractor} does not give; LOST boxes need a ViT or the pixels extractor")
    feats = extract(ext, feature_images(args, data, ext), args.batch_size, device, not args.quiet, _cache_dir(args),
                    data.names or None, NEEDS[args.method])
    return feats, ext.settings


def feature_images(args, data: ImageData, ext) -> torch.Tensor:
    """What the extractor reads, never the training images upsampled when a full-resolution source
    exists: --feature_data, else an image folder given as --data, decoded at the extractor's size;
    only arrays and packs at the training size fall back to their own images (with a note)."""
    size = getattr(ext, "size", (args.size,))[0]
    source = args.feature_data or (args.data if _image_folder(args.data) and size != args.size else "")
    if not source:
        if size > data.images.shape[-1] and not args.quiet:
            print(f"note: features from {data.images.shape[-1]}-px images upsampled to {size}; pass --feature_data "
                  f"(the source folder, or python -m sgengine.data pack SRC OUT --size {size})", file=sys.stderr)
        return data.images
    feat = load_data(source, size, args.channels, progress=not args.quiet)
    if len(feat) != len(data) or (feat.names and data.names and feat.names != data.names):
        raise ValueError(f"--feature_data {source} holds {len(feat)} images, not the same {len(data)} "
                         f"of --data {args.data} in the same order: pack both from one source")
    return feat.images


def _image_folder(path: str) -> bool:
    """A folder of image files (a source), not a pack (which holds manifest.json)."""
    return os.path.isdir(path) and not os.path.exists(os.path.join(path, "manifest.json"))


def _provides(ext) -> tuple[str, ...]:
    from .features import DiffusionExtractor

    return ("cls", "patches") if isinstance(ext, DiffusionExtractor) else ("cls", "patches", "keys")


def make_annotations(args, feats: dict, settings: dict, device: torch.device, images=None) -> Annotations:
    """Dispatch to the method; every method records its own settings in the file."""
    progress = not args.quiet
    if args.method == "labels":
        from .labels import label_annotations
        return label_annotations(feats["cls"], args.k, settings, niter=30, seed=args.seed)
    if args.method == "temi":
        from .temi import TEMIConfig, temi_annotations
        cfg = TEMIConfig(heads=args.temi_heads, lr=args.temi_lr, momentum=args.temi_momentum, seed=args.seed)
        return temi_annotations(feats["cls"], args.k, settings, args.epochs, cfg, device, progress)
    grid = tuple(feats["grid"].tolist())
    if args.method == "boxes":
        from .lost import box_annotations
        return box_annotations(feats["cls"], feats["keys"], grid, args.size, args.k, settings,
                               args.lost_k, args.seed, device, progress)
    from .crf import CRFConfig
    from .stego import StegoConfig, segment_annotations
    crf = CRFConfig(iters=args.crf_iters) if args.crf else None
    return segment_annotations(feats["patches"], feats["cls"], grid, args.k, args.size, settings,
                               StegoConfig(steps=args.steps, seed=args.seed), device, progress, images, crf)


def check_flags(args) -> None:
    """What the flags alone decide, before any image is read."""
    if args.crf and args.method != "segments":
        raise ValueError("--crf refines segment masks: use it with --method segments")
    images = "an image folder, a pack or an .npz/.npy array"
    for given, path, what in ((f"--data {args.data}", args.data, f"'digits', {images}"),
                              (f"--feature_data {args.feature_data}", args.feature_data, images),
                              (f"--extractor {args.extractor}", args.extractor.partition("diffusion:")[2],
                               "a run folder (the --out of sgengine.train)")):
        if path and path != "digits" and not os.path.exists(path):
            raise ValueError(f"{given}: {path} does not exist; pass {what}")


def _check(args, data: ImageData) -> None:
    if args.k < 1 or args.k > len(data):
        raise ValueError(f"--k must be in [1, {len(data)}] (the number of images), got {args.k}")
    if args.labels_metrics and data.labels is None:
        raise ValueError(f"--labels_metrics: {args.data} has no labels (class sub-folders or 'y' in the .npz)")


def run(args) -> tuple[Annotations, dict]:
    device = resolve_device(args.device)
    data = load_data(args.data, args.size, args.channels, progress=not args.quiet)
    report_skipped(data)
    _check(args, data)
    feats, ext_settings = features_for(args, data, device)
    settings = {"method": args.method, "features": ext_settings, "data": args.data, "n": len(data),
                "size": args.size, "seed": args.seed}
    ann = make_annotations(args, feats, settings, device, data.images)
    report = cluster_report(ann.ids, ann.k, data.labels)
    ann.settings["report"] = report
    save_annotations(args.out, ann)
    if args.inspect:
        from .inspect import render_annotations
        print(f"inspection grid -> {render_annotations(data.images, ann, args.inspect)}")
    return ann, report


def check_outputs(args) -> None:
    """The annotation file, the --inspect image and the feature cache, checked before any feature is extracted."""
    fix = "choose another path"
    check_writable(args.out, "--out", fix, folder=False)
    if args.inspect:
        check_writable(args.inspect, "--inspect", fix, folder=False)
    if _cache_dir(args) is not None:
        check_writable(_cache_dir(args), "the feature cache", "choose another --cache, or --cache none")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        check_outputs(args)
        ann, report = run(args)
    except (ValueError, OSError, KeyError, RuntimeError, ImportError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    lay = "" if ann.layout is None else f", layout {tuple(ann.layout.shape[1:])}"
    print(f"{args.method}: {len(ann)} images, K={ann.k}{lay}: {format_report(report)}")
    print(f"wrote {args.out}; train on it with: python -m sgengine.train --condition annotations "
          f"--annotations {args.out} --data {args.data}")
    return 0


if __name__ == "__main__":
    run_cli(main)
