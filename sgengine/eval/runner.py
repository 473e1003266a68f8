"""Evaluation runs: feature network by name, cached reference statistics, metrics of images or of a
generator, and the periodic evaluation during training that keeps the best checkpoint by distance.

Every report names its feature network (``feature_network`` / ``metric``): only Inception-v3
figures are called FID; DINOv2 gives FD_DINOv2 (Stein et al. 2023) and a substitute classifier
gives FD_classifier, so figures from a substitute network are never passed off as Inception FID.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data import ImageData, is_pack, load_array, load_folder, list_images, np_load, open_pack, to_uint8
from ..data.sources import READ_ERRORS
from ..sampling import Generator, sample
from ..common.io import append_line, atomic_write
from ..common.ranks import from_main
from .features import (INCEPTION_NAME, batched_features, batched_features_and_probs, dinov2_extractor,
                       inception_extractor)
from .frechet import FeatureStats, feature_stats, frechet_from_stats, load_stats, save_stats
from .metrics import inception_score, precision_recall


class Reference(NamedTuple):
    stats: FeatureStats
    feats: torch.Tensor | None  # (N, d) reference features for precision/recall; None from a stats file
    skipped: tuple = ()  # (file, reason) of the reference folder's unreadable images, left out of the stats


# ------------------------------------------------------------------------------ feature networks

def feature_network(spec: str = "", device: str | torch.device = "cpu", inception_weights=None):
    """'' or 'inception' | 'dinov2:FILE' | 'classifier:FILE' (a bare existing file = a classifier)."""
    kind, _, arg = spec.partition(":")
    if spec in ("", "inception"):
        return inception_extractor(inception_weights, device)
    if kind == "dinov2" and arg:
        return dinov2_extractor(arg, device=device)
    if kind == "classifier" and arg:
        from .classifier import ClassifierFeatures
        return ClassifierFeatures(arg, device)
    if Path(spec).is_file():
        from .classifier import ClassifierFeatures
        return ClassifierFeatures(spec, device)
    raise ValueError(f"unknown feature network {spec!r}: use 'inception', 'dinov2:FILE' or 'classifier:FILE' "
                     "(train one with `python -m sgengine.eval train-classifier --data DIR --out FILE`)")


def metric_name(extractor) -> str:
    if extractor.name == INCEPTION_NAME:
        return "FID"
    return "FD_DINOv2" if extractor.name.startswith("dinov2") else "FD_classifier"


def describe(extractor) -> str:
    """A human-readable name of the feature space, written into every report."""
    if hasattr(extractor, "description"):
        return extractor.description
    if extractor.name == INCEPTION_NAME:
        return "Inception-v3 (TF 2015-12-05) pool3 features: FID"
    return f"{extractor.name} CLS features (FD_DINOv2, not Inception)"


# ------------------------------------------------------------------------------ images and references

def load_images(spec: str | os.PathLike, progress: bool = True) -> ImageData:
    """ImageData with uint8 (N, C, H, W) images from a pack (memory-mapped), a folder (RGB, at the
    first readable image's size; unreadable files are skipped and listed in ``.skipped``, as training
    does) or an .npz/.npy array."""
    path = Path(spec)
    if is_pack(path):
        return open_pack(path, names=False)
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise FileNotFoundError(f"no images found under {path}")
        return load_folder(path, _first_size(files), 3, progress)
    if path.is_file() and path.suffix in (".npz", ".npy"):
        return load_array(path)
    raise FileNotFoundError(f"{spec!r} is neither an image folder nor an .npz/.npy file of images")


def _first_size(files: list[Path]) -> int:
    """The side of the first readable image (a truncated first file must not decide, nor stop, the run)."""
    for f in files:
        try:
            with Image.open(f) as im:
                return min(im.size)
        except READ_ERRORS:
            continue
    raise ValueError(f"none of the {len(files)} images under {files[0].parent} could be read")


def is_stats_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not (path.is_file() and path.suffix == ".npz"):
        return False
    with np_load(path) as z:
        return "mu" in z.files and "sigma" in z.files


def cache_paths(ref: str | os.PathLike, extractor) -> tuple[Path, Path]:
    """(stats .npz, features .npy) next to the reference, keyed by the feature network's name."""
    p = Path(os.path.normpath(ref))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor.name)
    base = f"{p.stem if p.is_file() else p.name}.stats-{slug}"  # names joined by hand: the slug has dots
    return p.parent / f"{base}.npz", p.parent / f"{base}.feats.npy"


def reference(ref: str | os.PathLike, extractor, batch_size: int = 250, device=None,
              progress: bool = True) -> Reference:
    """Reference statistics: a stats file as given, else computed once and cached next to ``ref``."""
    if is_stats_file(ref):
        stats = load_stats(ref)
        if stats.meta.get("extractor", extractor.name) != extractor.name:
            raise ValueError(f"{ref} holds statistics of {stats.meta['extractor']!r}, not {extractor.name!r}: "
                             "pass the reference images instead, or the matching --features")
        return Reference(stats, None)
    stats_file, feats_file = cache_paths(ref, extractor)
    if stats_file.is_file():
        feats = torch.from_numpy(np.load(feats_file)) if feats_file.is_file() else None
        stats = load_stats(stats_file)
        return Reference(stats, feats, tuple(map(tuple, json.loads(stats.meta.get("skipped", "[]")))))
    data = load_images(ref, progress)
    feats = batched_features(extractor, data.images, batch_size, device, progress)
    mu, sigma = feature_stats(feats)
    skipped = json.dumps(data.skipped)  # kept with the cache: a later run reports them too
    try:
        _write_cache(stats_file, feats_file, feats, mu, sigma, extractor=extractor.name, n=len(feats), source=str(ref),
                     skipped=skipped)
    except OSError as err:  # a read-only data folder: evaluate anyway, only the cache is lost
        warnings.warn(f"could not cache reference statistics at {stats_file}: {err}")
    return Reference(FeatureStats(mu, sigma, {"extractor": extractor.name}), feats, tuple(map(tuple, data.skipped)))


def _write_cache(stats_file: Path, feats_file: Path, feats: torch.Tensor, mu, sigma, **meta) -> None:
    """Features first, statistics last, each renamed into place: a killed run leaves no cache that
    looks complete (the statistics file is what ``reference`` looks for)."""
    def save_feats(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object stops numpy from appending '.npy'
            np.save(fh, feats.numpy())
    atomic_write(feats_file, save_feats)
    atomic_write(stats_file, lambda tmp: save_stats(tmp, mu, sigma, **meta))


# ------------------------------------------------------------------------------ metrics

def evaluate_images(images: torch.Tensor, ref: Reference, extractor, batch_size: int = 250, device=None,
                    splits: int = 10, k: int = 3, progress: bool = True) -> dict:
    """Fréchet distance, IS (when the network classifies) and precision/recall (when ref features exist)."""
    if hasattr(extractor, "features_and_probs"):
        feats, probs = batched_features_and_probs(extractor, images, batch_size, device, progress)
    else:
        feats, probs = batched_features(extractor, images, batch_size, device, progress), None
    mu, sigma = feature_stats(feats)
    report = {"metric": metric_name(extractor), "feature_network": describe(extractor),
              "extractor": extractor.name, "n": len(feats),
              "frechet_distance": frechet_from_stats(FeatureStats(mu, sigma, {"extractor": extractor.name}), ref.stats)}
    if probs is not None and len(probs) >= splits:
        report["inception_score"], report["inception_score_std"] = inception_score(probs, splits)
    if ref.feats is not None and min(len(feats), len(ref.feats)) > k:
        report["precision"], report["recall"] = precision_recall(ref.feats, feats, k)
    return report


def generate(gen: Generator, n: int, w: float = 2.0, steps: int = 50, batch_size: int = 250, seed: int = 0,
             sampler: str | None = None, progress: bool = True) -> torch.Tensor:
    """uint8 (n, C, H, W) samples; ``sample`` draws each batch's conditions from the training set's
    cluster frequencies (sampling.draw_clusters) with the batch's own seed."""
    out = []
    with torch.no_grad():
        for i, start in enumerate(tqdm(range(0, n, batch_size), desc="sampling", disable=not progress, leave=False)):
            m = min(batch_size, n - start)
            out.append(to_uint8(sample(gen, None, m, w=w, steps=steps, sampler=sampler, seed=seed + i).cpu()))
    return torch.cat(out)


def evaluate_generator(gen: Generator, ref_stats: Reference | FeatureStats, extractor, n: int, w: float = 2.0,
                       steps: int = 50, batch_size: int = 250, seed: int = 0, sampler: str | None = None,
                       progress: bool = True) -> dict:
    """Metrics of ``n`` samples of ``gen`` against the reference (see ``evaluate_images``)."""
    if n < 2:
        raise ValueError(f"n must be >= 2 samples for a covariance, got {n}")
    ref = ref_stats if isinstance(ref_stats, Reference) else Reference(ref_stats, None)
    images = generate(gen, n, w, steps, batch_size, seed, sampler, progress)
    report = evaluate_images(images, ref, extractor, batch_size, progress=progress)
    return {**report, "w": w, "sampler_steps": steps, "seed": seed}


# ------------------------------------------------------------------------------ during training

_CONTEXT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # trainer -> (extractor, reference)


def _context(trainer) -> tuple:
    """The feature network and reference statistics, built on the first evaluation of a run only."""
    if trainer not in _CONTEXT:
        cfg = trainer.cfg
        if not cfg.eval_ref:
            raise ValueError("eval_every > 0 needs a reference: pass --eval_ref DIR|images.npz|stats.npz")
        extractor = feature_network(cfg.eval_features, trainer.device)
        _CONTEXT[trainer] = (extractor, reference(cfg.eval_ref, extractor, progress=False))
    return _CONTEXT[trainer]


def periodic_eval(trainer) -> dict:
    """Evaluate the EMA model (cfg.eval_n samples, the grid's sampler settings), log to eval.jsonl and,
    when the distance is the lowest so far, checkpoint and make ckpt/best point at it. Call it on every
    rank: rank 0 evaluates and decides, and all ranks take the (collective under DeepSpeed) checkpoint."""
    main = getattr(getattr(trainer, "dist", None), "main", True)
    report = from_main(_evaluate_and_record(trainer) if main else None)
    if report["best"]:
        ckpt = trainer.checkpoint()
        if main:
            promote_best(ckpt, report)
    trainer.log(f"eval step {trainer.step}: {report['metric']} {report['frechet_distance']:.4g} "
                f"({report['feature_network']}){' new best' if report['best'] else ''}")
    return report


def _evaluate_and_record(trainer) -> dict:
    cfg, (extractor, ref) = trainer.cfg, _context(trainer)
    report = evaluate_generator(trainer.generator(), ref, extractor, cfg.eval_n, w=cfg.guidance_w,
                                steps=cfg.sample_steps, seed=cfg.seed, sampler=cfg.sampler or None,
                                progress=False)
    report = {"step": trainer.step, **report}
    append_line(Path(trainer.out) / "eval.jsonl", json.dumps(report))
    best = read_best(trainer.out, extractor.name)
    return {**report, "best": best is None or report["frechet_distance"] < best["frechet_distance"]}


def read_best(out: str | os.PathLike, extractor_name: str) -> dict | None:
    """The recorded best evaluation of a run, or None (none yet, or measured with another network)."""
    path = Path(out) / "ckpt" / "best.json"
    if not path.is_file():
        return None
    best = json.loads(path.read_text())
    return best if best.get("extractor") == extractor_name else None


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (copy where links are impossible) every file of ``src``, sub-folders included (a
    DeepSpeed checkpoint holds ``deepspeed/``), into a new folder ``dst``. Links are safe: checkpoint
    files are never rewritten in place, and they outlive pruning."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def promote_best(ckpt: Path, report: dict) -> Path:
    """ckpt/best -> a linked copy of ``ckpt``; the symlink is swapped with one rename, so a reader sees
    the old best or the new one, never a half-written folder. best.json records the score."""
    ckdir, ckpt = ckpt.parent, Path(ckpt)
    staged = ckdir / f".best-{ckpt.name}"
    _link_tree(ckpt, staged)
    link = ckdir / ".best.link.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(staged.name, link)
    os.replace(link, ckdir / "best")
    best = json.dumps({**report, "checkpoint": str(ckpt)}, indent=1)
    atomic_write(ckdir / "best.json", lambda tmp: tmp.write_text(best))
    for old in ckdir.glob(".best-*"):
        if old != staged and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return ckdir / "best"
