"""Compare guidance signals under one equal training budget (SPEC section 5, "Sample quality under a
small equal budget").

  python -m sgengine.experiment compare --data DIR|digits --methods none,labels,self-labeled:pca \\
      --budget_steps 2000 [--size 32] [--preset digits] [--eval_n 2000] [--features ...] --out DIR

Every method trains with the same preset, step budget and seed (same initialisation and batches),
is evaluated every ``--eval_every`` steps on its EMA model (Fréchet distance of ``--eval_n``
samples, conditions drawn from the training cluster frequencies), and the results go to
results.md, results.json and distance.png (distance against steps, one line per method).
Methods: none | labels | self-labeled[:pixels|pca|diffusion[:RUN]|<timm name>].
The default feature network is a classifier trained on the data's labels (sgengine.eval.classifier):
its figures are FD_classifier, not Inception FID.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from tqdm.auto import tqdm

from .common.flags import (ConfigError, Count, FlagParser, NonNeg, NonNegInt, Range, add_dataclass_flags, collect,
                           error_line, run_cli, validate)
from .config import apply_overrides, check_runnable, preset
from .data import ImageData, load_data
from .device import device_problem, resolve_device
from .eval.features import batched_features
from .eval.frechet import FeatureStats, feature_stats
from .eval.runner import Reference, describe, evaluate_generator, feature_network, metric_name, reference
from .checkpoint import latest_checkpoint
from .common.paths import check_writable
from .viz import plot_lines

BASE_METHODS = ("none", "labels", "self-labeled")

@dataclass(frozen=True)
class CompareConfig:
    data: str = "digits"
    methods: tuple[str, ...] = BASE_METHODS
    budget_steps: Count = 1500
    out: str = "runs/compare"
    preset: str = "digits"
    size: NonNegInt = 0  # 0: the preset's image size
    channels: NonNegInt = 0  # 0: 1 for the digits, 3 otherwise
    eval_n: Annotated[int, Range(ge=2)] = 500
    eval_every: NonNegInt = 0  # 0: four evaluations over the budget
    features: str = "classifier"  # 'classifier' = trained on the data's labels; or inception|dinov2:F|classifier:F
    ref: str = ""  # '' = the training data itself
    k: NonNegInt = 0  # self-label clusters; 0: the number of label classes (else the preset's k)
    pca_dim: Count = 32  # for self-labeled:pca
    extractor_weights: str = ""  # local weights for self-labeled:<timm name>
    clf_epochs: Count = 10
    clf_max_iters: NonNegInt = 0  # 0: no cap (quick runs and tests cap it)
    w: NonNeg = 2.0
    sample_steps: NonNegInt = 0  # 0: the preset's
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        validate(self)
        if device_problem(self.device):
            raise ConfigError("device", device_problem(self.device))
        try:
            methods = [parse_method(m) for m in self.methods]  # every method checked before any training
        except ValueError as err:
            raise ConfigError("methods", f"is refused: {err}") from None
        if any(m.features == "diffusion" for m in methods) and "none" not in self.methods:
            raise ConfigError("methods", "self-labeled:diffusion clusters the unconditional model's features: put "
                              "'none' in --methods (it trains first) or name a run, self-labeled:diffusion:RUN_DIR")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("methods", f"lists a method twice: {','.join(self.methods)}")


@dataclass(frozen=True)
class Method:
    name: str
    condition: str  # TrainConfig.condition
    features: str = ""  # self-labels: pixels | pca | diffusion[:RUN] | a timm model name


def parse_method(spec: str) -> Method:
    head, _, feat = spec.partition(":")
    if head in ("none", "labels") and not feat:
        return Method(spec, head)
    if head != "self-labeled":
        raise ValueError(f"unknown method {spec!r}: use none, labels or "
                         "self-labeled[:pixels|pca|diffusion|<timm name>]")
    feat = feat or "pixels"
    if feat in ("pixels", "pca"):
        return Method(spec, "self-labels", feat)
    if importlib.util.find_spec("sgengine.annotate.features") is None:
        raise ValueError(f"{spec!r} needs sgengine.annotate.features, which this install lacks: "
                         "use self-labeled:pixels or self-labeled:pca")
    return Method(spec, "annotations", feat)


# ------------------------------------------------------------------------------ setup

def device_of(cc: CompareConfig) -> torch.device:
    return resolve_device(cc.device)


def base_config(cc: CompareConfig):
    """The preset with the comparison's data, budget, size, channels and seed."""
    cfg = preset(cc.preset)
    over = {"data": cc.data, "steps": cc.budget_steps, "seed": cc.seed, "device": cc.device,
            "model.in_channels": cc.channels or (1 if cc.data == "digits" else 3), "eval_every": 0}
    if cc.size:
        over["model.img_size"] = cc.size
    if cc.sample_steps:
        over["sample_steps"] = cc.sample_steps
    return apply_overrides(cfg, over)


def feature_setup(cc: CompareConfig, data: ImageData, device) -> tuple:
    """(feature network, reference): the default classifier is trained once on the data's labels."""
    spec = cc.features
    if spec == "classifier":
        from .eval.classifier import train_classifier
        if data.labels is None:
            raise ValueError(f"{cc.data} has no labels to train the default classifier on: pass --features "
                             "inception, dinov2:FILE or classifier:FILE")
        path = train_classifier(data, data.images.shape[-1], cc.clf_epochs, Path(cc.out) / "classifier.pt",
                                channels=data.images.shape[1], seed=cc.seed, device=device,
                                max_iters=cc.clf_max_iters or None)
        spec = f"classifier:{path}"
    extractor = feature_network(spec, device)
    if cc.ref:
        return extractor, reference(cc.ref, extractor, device=device)
    feats = batched_features(extractor, data.images, device=device)  # the training images themselves
    return extractor, Reference(FeatureStats(*feature_stats(feats), {"extractor": extractor.name}), feats)


def num_clusters(cc: CompareConfig, cfg, data: ImageData) -> int:
    if cc.k:
        return cc.k
    return int(data.labels.max()) + 1 if data.labels is not None else cfg.k


def run_dir(cc: CompareConfig, method: Method) -> Path:
    return Path(cc.out) / method.name.replace(":", "-").replace("/", "_")


def method_config(method: Method, cc: CompareConfig, base, data: ImageData, runs: dict):
    """The TrainConfig of one method: its condition, and its self-labels where it needs them."""
    out = run_dir(cc, method)
    over = {"out": str(out), "condition": method.condition, "k": num_clusters(cc, base, data)}
    if method.features in ("pixels", "pca"):
        over["pca_dim"] = 0 if method.features == "pixels" else cc.pca_dim
        pixel_labels(out, over["k"], over["pca_dim"], cc, data)
    elif method.condition == "annotations":
        over["annotations"] = str(external_labels(method, cc, over["k"], data, out, runs))
    return apply_overrides(base, over)


def pixel_labels(out: Path, k: int, pca_dim: int, cc: CompareConfig, data: ImageData) -> Path:
    """The trainer's self-label file (what the train CLI makes), from the data loaded once here."""
    from .annotate.io import save_annotations
    from .annotate.labels import pixel_self_labels
    from .training.trainer import SELF_LABELS_FILE

    path = out / SELF_LABELS_FILE
    save_annotations(path, pixel_self_labels(data.images, k, pca_dim, cc.seed, cc.data))
    return path


def external_labels(method: Method, cc: CompareConfig, k: int, data: ImageData, out: Path, runs: dict) -> Path:
    """Self-labels by k-means on timm-ViT or diffusion features (sgengine.annotate), saved for the trainer."""
    from .annotate.features import extract, make_extractor
    from .annotate.io import save_annotations
    from .annotate.labels import label_annotations

    spec = f"diffusion:{runs['none']}" if method.features == "diffusion" else method.features  # see CompareConfig
    extractor = make_extractor(spec, weights=cc.extractor_weights or None, device=device_of(cc))
    feats = extract(extractor, data.images, cache=Path(cc.out) / "features", names=data.names)["cls"]
    settings = {"method": "labels", "features": spec, "data": cc.data, "n": len(data)}
    path = out / "self-labels.safetensors"
    save_annotations(path, label_annotations(feats, k, settings, niter=30, seed=cc.seed))
    return path


# ------------------------------------------------------------------------------ training

def label_quality(trainer) -> dict:
    """NMI etc. of the run's cluster ids against the data's labels, when both exist."""
    if trainer.ann is None or trainer.data.labels is None:
        return {}
    try:
        from .eval.cluster import cluster_report
    except ImportError:  # cluster metrics are optional here
        return {}
    return cluster_report(trainer.ann.ids, trainer.ann.k, trainer.data.labels.cpu())


def train_and_track(cfg, cc: CompareConfig, extractor, ref: Reference, log=print) -> dict:
    """Train one method for the budget, evaluating its EMA model every ``eval_every`` steps."""
    from .training.trainer import Trainer

    trainer, every = Trainer(cfg, log=log), cc.eval_every or max(1, cc.budget_steps // 4)
    curve, losses, train_s = [], [], 0.0
    for _ in tqdm(range(cc.budget_steps), desc=Path(cfg.out).name, dynamic_ncols=True):
        t0 = time.perf_counter()
        losses.append(trainer.train_step())
        train_s += time.perf_counter() - t0
        if trainer.step % every == 0 or trainer.step == cc.budget_steps:
            rep = evaluate_generator(trainer.generator(), ref, extractor, cc.eval_n, w=cc.w,
                                     steps=trainer.cfg.sample_steps, seed=cc.seed, progress=False)
            curve.append({"step": trainer.step, "loss": float(torch.stack(losses).mean()), **_scores(rep)})
            losses = []
    finished = trainer.finish()
    k = trainer.ann.k if trainer.ann is not None else 0
    return {"condition": cfg.condition, "k": k, "run": cfg.out, "curve": curve,
            "train_seconds": train_s, "labels": label_quality(trainer), "grid": str(finished["grid"])}


def _scores(report: dict) -> dict:
    keys = ("frechet_distance", "inception_score", "precision", "recall")
    return {k: report[k] for k in keys if k in report}


def compare(cc: CompareConfig, log=print) -> dict:
    """Train and evaluate every method; write results.json, results.md and distance.png to cc.out."""
    out, device, base = Path(cc.out), device_of(cc), base_config(cc)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cc.data, base.model.img_size, base.model.in_channels)
    if "labels" in cc.methods and data.labels is None:
        raise ValueError(f"method 'labels' needs labelled data, and {cc.data} has none (class sub-folders or 'y' "
                         "in the .npz): drop it from --methods")
    extractor, ref = feature_setup(cc, data, device)
    methods = sorted(map(parse_method, cc.methods), key=lambda m: m.name != "none")  # 'none' first: diffusion labels
    done = [str(run_dir(cc, m)) for m in methods if latest_checkpoint(run_dir(cc, m)) is not None]
    if done:
        raise FileExistsError(f"{', '.join(done)} already hold trained runs: choose another --out or delete them")
    runs, results = {}, {}
    for m in methods:
        cfg = method_config(m, cc, base, data, runs)
        results[m.name] = train_and_track(cfg, cc, extractor, ref, log)
        runs[m.name] = cfg.out
    summary = {"config": dataclasses.asdict(cc), "metric": metric_name(extractor),
               "feature_network": describe(extractor), "extractor": extractor.name, "methods": results}
    write_outputs(summary, out)
    return summary


# ------------------------------------------------------------------------------ outputs

def write_outputs(summary: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown_table(summary))
    series = {name: ([p["step"] for p in r["curve"]], [p["frechet_distance"] for p in r["curve"]])
              for name, r in summary["methods"].items()}
    plot_lines(series, out / "distance.png", f"{summary['metric']} vs training steps ({summary['feature_network']})")


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(summary: dict) -> str:
    cc = summary["config"]
    lines = [f"# Equal-budget comparison on {cc['data']}", "",
             f"{cc['budget_steps']} steps each, preset {cc['preset']}, seed {cc['seed']}; {cc['eval_n']} samples "
             f"(w={cc['w']}) per evaluation. Distance: {summary['metric']} in {summary['feature_network']}.", "",
             f"| method | condition | K | final {summary['metric']} | best (step) | IS | precision | recall "
             "| label NMI | train s |", "|" + "---|" * 10]
    for name, r in summary["methods"].items():
        last, best = r["curve"][-1], min(r["curve"], key=lambda p: p["frechet_distance"])
        lines.append(f"| {name} | {r['condition']} | {r['k']} | {_fmt(last['frechet_distance'], '.4g')} "
                     f"| {_fmt(best['frechet_distance'], '.4g')} ({best['step']}) "
                     f"| {_fmt(last.get('inception_score'))} "
                     f"| {_fmt(last.get('precision'))} | {_fmt(last.get('recall'))} "
                     f"| {_fmt(r['labels'].get('nmi'))} | {r['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ command line

HELP = {"methods": "comma-separated: none, labels, self-labeled[:pixels|pca|diffusion[:RUN]|<timm name>]",
        "features": "classifier (trained on --data's labels; FD_classifier) | inception | dinov2:FILE | classifier:FILE",
        "ref": "reference images or stats for the distance (default: the training data itself)",
        "eval_every": "steps between evaluations (default: budget / 4)"}


def build_parser() -> FlagParser:
    p = FlagParser(prog="python -m sgengine.experiment")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="train each guidance method with the same budget and compare sample quality")
    add_dataclass_flags(c, CompareConfig, CompareConfig(), docs=HELP)
    return p


def parse_args(argv=None) -> CompareConfig:
    """The checked CompareConfig; every setting, the trainer's ones (preset, device, sizes) and --out
    included, is refused here with one ``error:`` line, before any data is read or model trained."""
    parser = build_parser()
    args = collect(parser.parse_args(argv), [f.name for f in dataclasses.fields(CompareConfig)])
    try:
        cc = apply_overrides(CompareConfig(), args)
        check_runnable(base_config(cc))
        check_writable(cc.out, "--out", "choose another --out")
        return cc
    except ConfigError as err:
        parser.fail(err)
    except ValueError as err:  # bad methods: a usage error, not a traceback
        parser.error(str(err))


def main(argv=None) -> int:
    cc = parse_args(argv)
    try:
        compare(cc)
    except (ValueError, OSError, KeyError, ImportError) as err:  # data, references, feature networks
        print(error_line(err), file=sys.stderr)
        return 2
    print((Path(cc.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    run_cli(main)
