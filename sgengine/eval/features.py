"""Feature extractors for FID / FDD / IS / precision-recall, loaded from local weight files only.

A ``FeatureExtractor`` maps images (B, C, H, W), uint8 in [0, 255] or float in [-1, 1], C in
{1, 3}, to (B, d) float features; one that also classifies (Inception) offers
``features_and_probs`` for the inception score from the same forward pass. Float images are
quantised to uint8 first, so generated samples are measured exactly as if saved to PNG (the
protocol of EDM and C-EDM); grey images are repeated to RGB.

- ``inception_extractor``: the TensorFlow FID Inception-v3 (2015-12-05 graph, 2048-d pool3
  features, resized to 299 inside the network as in EDM's fid.py). It accepts NVIDIA's TorchScript
  detector ``inception-2015-12-05.pt`` (EDM, StyleGAN, clean-fid; no extra package needed) or
  torch-fidelity's state dict ``weights-inception-2015-12-05-6726825d.pth`` (needs torch-fidelity).
- ``dinov2_extractor``: DINOv2 through timm (CLS token after the final norm, bicubic resize to
  224 and ImageNet normalisation as in Stein et al. 2023); FDD uses ViT-L/14.
Nothing is downloaded: a missing file is a clear error saying where to put one.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import to_uint8

INCEPTION_ENV = "SGENGINE_INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-v3-tf"  # both accepted files port the same TF graph: statistics are interchangeable
NVIDIA_INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                        "inception-2015-12-05.pt")
FIDELITY_INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                          "weights-inception-2015-12-05-6726825d.pth")


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str  # recorded in saved statistics, so that FIDs never mix extractors
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 or float in [-1, 1] -> (B, dim) float32."""


@runtime_checkable
class ClassifierExtractor(FeatureExtractor, Protocol):
    num_classes: int

    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, dim) features, (B, num_classes) class probabilities) from one pass."""


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) from uint8 or float-in-[-1, 1] images with 1 or 3 channels."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        lo, hi = images.min().item(), images.max().item()
        if lo < -2 or hi > 2:  # generous: unclipped samples overshoot [-1, 1] a little
            raise ValueError(f"float images must be in [-1, 1], found [{lo:.3g}, {hi:.3g}]; "
                             "pass [0, 255] data as uint8")
        images = to_uint8(images)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


# ------------------------------------------------------------------------------------ Inception

class TorchScriptInception(nn.Module):
    """NVIDIA's TorchScript FID detector: net(uint8 images, return_features=True) -> pool3 (B, 2048)."""
    name, dim, num_classes = INCEPTION_NAME, 2048, 1008

    def __init__(self, net: torch.jit.ScriptModule):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_uint8_rgb(images), return_features=True).float()

    def features_and_probs(self, images: torch.Tensor):
        x = to_uint8_rgb(images)
        # no_output_bias: the softmax of the original IS code omits the last layer's bias (StyleGAN's metrics)
        return self.net(x, return_features=True).float(), self.net(x, no_output_bias=True).float()


class FidelityInception(nn.Module):
    """torch-fidelity's port of the same graph; one pass gives pool3 and the bias-free logits."""
    name, dim, num_classes = INCEPTION_NAME, 2048, 1008

    def __init__(self, path: Path):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError(f"{path} is torch-fidelity's Inception state dict: pip install torch-fidelity, "
                              f"or use NVIDIA's TorchScript file ({NVIDIA_INCEPTION_URL})") from e
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(path))

    def features_and_probs(self, images: torch.Tensor):
        f, logits = self.net(to_uint8_rgb(images))
        return f.float(), logits.float().softmax(-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_probs(images)[0]


def _inception_search_paths() -> list[Path]:
    hub = Path(torch.hub.get_dir()) / "checkpoints"  # where torch-fidelity's download would have cached it
    return [hub / "inception-2015-12-05.pt", hub / "weights-inception-2015-12-05-6726825d.pth",
            Path("/tmp/inception-2015-12-05.pt")]  # clean-fid's default download folder


def _missing_inception(searched: list[Path]) -> FileNotFoundError:
    return FileNotFoundError(
        "Inception-v3 FID weights are missing (sgengine never downloads them). Get one of\n"
        f"  {NVIDIA_INCEPTION_URL}  (TorchScript, used by EDM/StyleGAN/clean-fid; no extra package)\n"
        f"  {FIDELITY_INCEPTION_URL}  (needs pip install torch-fidelity)\n"
        f"on a machine with network, copy it here and pass inception_extractor(weights=PATH) or set "
        f"{INCEPTION_ENV}=PATH. Searched: {', '.join(map(str, searched))}")


def find_inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """The weights file: ``weights``, else $SGENGINE_INCEPTION_WEIGHTS, else the known cache paths."""
    given = weights if weights is not None else os.environ.get(INCEPTION_ENV)
    searched = [Path(given)] if given else _inception_search_paths()
    for p in searched:
        if p.is_file():
            return p
    raise _missing_inception(searched)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry code/ and constants.pkl; torch.save state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def inception_extractor(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The FID Inception-v3 as a ``ClassifierExtractor`` on ``device``, from a local file (see module doc)."""
    path = find_inception_weights(weights)
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript, but this file exists only as one
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location=device)
        return TorchScriptInception(net).eval()
    return FidelityInception(path).to(device).eval()


# ------------------------------------------------------------------------------------ DINOv2

class DinoV2Features(nn.Module):
    """CLS token of a timm DINOv2 ViT on bicubic-resized, ImageNet-normalised RGB."""

    def __init__(self, net: nn.Module, model: str, img_size: int):
        super().__init__()
        self.net, self.img_size = net, img_size
        self.name, self.dim = f"dinov2:{model}@{img_size}", net.num_features
        cfg = net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8_rgb(images).to(self.mean.device).float() / 255
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", antialias=True, align_corners=False)
        return self.net((x - self.mean) / self.std).float()


def dinov2_extractor(weights_path: str | os.PathLike, model: str = "vit_large_patch14_dinov2", img_size: int = 224,
                     device: str | torch.device = "cpu") -> DinoV2Features:
    """DINOv2 features through timm from a local weights file (.safetensors or .pth, timm's or Meta's
    original key names; position embeddings are resampled to ``img_size``). FDD uses ViT-L/14 at 224."""
    try:
        import timm
    except ImportError as e:
        raise ImportError("DINOv2 features (--features dinov2:FILE) need timm: pip install timm "
                          "(or pip install sgengine[timm])") from e
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"no DINOv2 weights at {path}: download the timm/{model} weights (or Meta's "
                                "dinov2_vit*14_pretrain.pth) on a machine with network and pass the file's path")
    try:
        net = timm.create_model(model, pretrained=True, num_classes=0, img_size=img_size,
                                pretrained_cfg_overlay={"file": str(path)})
    except RuntimeError as e:
        raise ValueError(f"the weights in {path} do not fit timm model {model!r} (wrong model size?): {e}") from e
    return DinoV2Features(net.eval().requires_grad_(False), model, img_size).to(device)


# ------------------------------------------------------------------------------------ batching

def _device_of(extractor) -> torch.device:
    if isinstance(extractor, nn.Module):
        for t in (*extractor.parameters(), *extractor.buffers()):
            return t.device
    return torch.device("cpu")


def _batched(fn, images, batch_size: int, device, progress: bool) -> list:
    """fn applied to batches (a tensor is split; an iterable supplies its own batches), outputs on CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    outs = []
    with torch.inference_mode():
        for x in tqdm(batches, desc="features", disable=not progress, leave=False):
            out = fn(x.to(device, non_blocking=True))
            outs.append(tuple(o.float().cpu() for o in out) if isinstance(out, tuple) else out.float().cpu())
    if not outs:
        raise ValueError("no images to extract features from")
    return outs


def batched_features(extractor: FeatureExtractor, images: torch.Tensor | Iterable[torch.Tensor],
                     batch_size: int = 250, device: str | torch.device | None = None,
                     progress: bool = False) -> torch.Tensor:
    """(N, d) float32 CPU features of all images. ``device`` defaults to the extractor's."""
    device = _device_of(extractor) if device is None else device
    return torch.cat(_batched(extractor, images, batch_size, device, progress))


def batched_features_and_probs(extractor: ClassifierExtractor, images, batch_size: int = 250,
                               device: str | torch.device | None = None, progress: bool = False):
    """((N, d) features, (N, num_classes) probabilities) from one pass over the images."""
    if not hasattr(extractor, "features_and_probs"):
        raise TypeError(f"{type(extractor).__name__} has no features_and_probs: use inception_extractor() for IS")
    device = _device_of(extractor) if device is None else device
    outs = _batched(extractor.features_and_probs, images, batch_size, device, progress)
    return torch.cat([f for f, _ in outs]), torch.cat([p for _, p in outs])
