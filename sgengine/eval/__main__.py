"""Command line: sample quality of a set of images, and the substitute feature classifier.

  python -m sgengine.eval --samples DIR|x.npz --ref DIR|x.npz|stats.npz [--features ...] [--out report.json]
  python -m sgengine.eval train-classifier --data DIR|digits|x.npz --out clf.pt [--size 32] [--epochs 10]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Literal

from ..common.flags import Count, FlagParser, add_typed, error_line, run_cli
from ..common.paths import check_writable
from ..device import device_flag
from .runner import evaluate_images, feature_network, load_images, reference


def eval_parser() -> FlagParser:
    p = FlagParser(prog="python -m sgengine.eval", description=(
        "Frechet distance (FID with Inception), Inception Score and improved precision/recall of a set of "
        "samples against a reference. Subcommand: train-classifier (a substitute feature network)."))
    p.add_argument("--samples", required=True, help="folder of images or .npz/.npy array of generated samples")
    p.add_argument("--ref", required=True, help="reference: folder, .npz/.npy images, or a statistics .npz "
                   "(statistics are cached next to the reference, keyed by the feature network)")
    p.add_argument("--features", default="inception",
                   help="inception (default) | dinov2:FILE (FD_DINOv2) | classifier:FILE (not Inception)")
    p.add_argument("--inception_weights", help="local Inception file (else $SGENGINE_INCEPTION_WEIGHTS)")
    add_typed(p, "--batch_size", Count, default=250, help="images per feature-network forward")
    p.add_argument("--device", default="auto", type=device_flag, help="'auto': CUDA when available")
    p.add_argument("--out", help="write the report as JSON here")
    return p


def train_parser() -> FlagParser:
    p = FlagParser(prog="python -m sgengine.eval train-classifier", description=(
        "Train a small ResNet on labelled images (class folders, digits, or .npz with 'y') as a Frechet "
        "feature network when the Inception weights are unavailable. Cached: an existing --out is kept."))
    p.add_argument("--data", required=True, help="'digits', a folder of class sub-folders (Tiny ImageNet: its train/ folder), "
                   "or .npz with 'y' labels")
    p.add_argument("--out", required=True, help="classifier file to write (e.g. clf.pt)")
    add_typed(p, "--size", Count, default=32, help="image size the classifier sees (inputs are resized)")
    add_typed(p, "--channels", Literal[1, 3], default=3, help="image channels")
    add_typed(p, "--epochs", Count, default=10, help="training epochs")
    add_typed(p, "--max_iters", Count | None, default=None, help="cap on optimiser steps (quick runs)")
    add_typed(p, "--width", Count, default=32, help="channels of the first ResNet stage")
    add_typed(p, "--batch_size", Count, default=128, help="training batch size")
    add_typed(p, "--seed", int, default=0)
    p.add_argument("--device", default="auto", type=device_flag, help="'auto': CUDA when available")
    return p


def run_eval(args: argparse.Namespace) -> dict:
    for flag in ("samples", "ref"):  # before the feature network loads and the reference is read
        if not Path(getattr(args, flag)).exists():
            raise FileNotFoundError(f"--{flag} {getattr(args, flag)} does not exist: pass a folder of images, a pack, "
                                    "or an .npz/.npy array" + (" or statistics file" if flag == "ref" else ""))
    samples = load_images(args.samples)  # read first: a damaged file fails before any feature is computed
    extractor = feature_network(args.features, args.device, args.inception_weights)
    ref = reference(args.ref, extractor, args.batch_size, args.device)
    report = evaluate_images(samples.images, ref, extractor, args.batch_size, args.device)
    skipped = {"samples": [list(s) for s in samples.skipped], "ref": [list(s) for s in ref.skipped]}
    for flag, files in skipped.items():
        if files:  # reported, not fatal: the metric is over the readable images (n says how many)
            print(f"note: --{flag} {getattr(args, flag)}: skipped {len(files)} unreadable file(s), left out of the "
                  f"metrics: {'; '.join(f'{f} ({why})' for f, why in files)}", file=sys.stderr)
    report = {**report, "samples": str(args.samples), "ref": str(args.ref), "skipped": skipped}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def run_train(args: argparse.Namespace) -> Path:
    from .classifier import ClassifierFeatures, train_classifier

    path = train_classifier(args.data, args.size, args.epochs, args.out, channels=args.channels, width=args.width,
                            batch_size=args.batch_size, seed=args.seed, device=args.device, max_iters=args.max_iters)
    print(f"classifier {path} (train accuracy {ClassifierFeatures(path).meta['train_acc']:.3f}); "
          f"evaluate with --features classifier:{path}")
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    train = argv[:1] in (["train-classifier"], ["train_classifier"])
    args = train_parser().parse_args(argv[1:]) if train else eval_parser().parse_args(argv)
    try:
        if args.out:  # before features are extracted or a classifier is trained
            check_writable(args.out, "--out", "choose another --out", folder=False)
        if train:
            run_train(args)
            return 0
        report = run_eval(args)
    except FileNotFoundError as err:
        print(error_line(FileNotFoundError(_missing(err, args))), file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError, ImportError) as err:
        print(error_line(err), file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


def _missing(err: FileNotFoundError, args) -> str:
    """Missing Inception weights name both ways out; any other missing file is said as it is."""
    if getattr(args, "features", None) not in ("", "inception") or "Inception" not in str(err):
        return str(err)
    return (f"{' '.join(str(err).split())} Pass a local copy with --inception_weights FILE; without "
            "Inception weights, measure a Frechet distance in a substitute network: `python -m sgengine.eval "
            "train-classifier --data REF_DIR --out clf.pt`, then --features classifier:clf.pt (reported as "
            "FD_classifier, not FID).")

if __name__ == "__main__":
    run_cli(main)
