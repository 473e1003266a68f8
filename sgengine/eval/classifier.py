"""A Fréchet feature network for machines without the Inception weights: a small ResNet classifier.

``train_classifier`` fits a ResNet-style classifier (3 stages of basic blocks, He et al. 2016) on a
labelled reference set (class folders such as Tiny ImageNet's, or the digits) once, and writes it
to a file; a second call with the same file returns at once. ``ClassifierFeatures(file)`` is a
``ClassifierExtractor``: globally pooled penultimate features for a Fréchet distance and softmax
class probabilities for an inception-score analogue. Its ``name`` carries a hash of the file, so
statistics from two different classifiers are never mixed, and every report calls the figures
"classifier:<name> penultimate features (not Inception)": they rank models trained on the same
data but are not comparable with published FIDs (SPEC section 5 uses a ResNet-18 the same way).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import ImageData, load_data
from ..common.io import atomic_write
from .features import to_uint8_rgb


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    """Stem, stages of width (w, 2w, 4w) at strides (1, 2, 2), global average pool, linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)
        self.dim = 4 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _as_data(data: str | ImageData, size: int, channels: int) -> ImageData:
    data = load_data(data, size, channels) if isinstance(data, str) else data
    if data.labels is None:
        raise ValueError("train_classifier needs labels: class sub-folders, 'y'/'labels' in the .npz, or 'digits'")
    if len(data) < 2 or int(data.labels.max()) < 1:
        raise ValueError(f"train_classifier needs at least 2 images of 2 classes, got {len(data)} images")
    return data


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 1-pixel-padded shifts: enough regularisation for a feature network, and safe for digits
    (no flips, which would change a digit's meaning)."""
    pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
    return pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _fit(net: SmallResNet, data: ImageData, epochs: int, batch_size: int, lr: float, seed: int,
         device, max_iters: int | None, progress: bool) -> float:
    g = torch.Generator().manual_seed(seed)
    iters = max(1, epochs * -(-len(data) // batch_size))
    iters = min(iters, max_iters) if max_iters else iters
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters)
    correct = seen = 0
    for it in tqdm(range(iters), desc="train classifier", disable=not progress):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x, y = _augment(data.batch(idx, device), g), data.labels[idx].to(device)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it >= iters - max(1, iters // 5):  # accuracy over the last fifth: the trained net, not the start
            correct, seen = correct + (logits.argmax(1) == y).sum().item(), seen + len(y)
    return correct / max(seen, 1)


def train_classifier(data: str | ImageData, size: int, epochs: int, out_file: str | os.PathLike, *,
                     channels: int = 3, width: int = 32, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, device: str | torch.device = "cpu", max_iters: int | None = None,
                     progress: bool = True) -> Path:
    """Train the feature classifier on labelled ``data`` (a spec for load_data, or ImageData) and
    save it to ``out_file``; an existing file is returned untouched (delete it to retrain)."""
    out = Path(out_file)
    if out.is_file():
        return out
    data = _as_data(data, size, channels)
    if data.images.shape[-1] != size or data.images.shape[1] != channels:
        raise ValueError(f"ImageData is {tuple(data.images.shape[1:])} but size={size}, channels={channels}: "
                         "load it at the size and channels you pass")
    torch.manual_seed(seed)
    num_classes = int(data.labels.max()) + 1
    net = SmallResNet(channels, num_classes, width).to(device).train()
    acc = _fit(net, data, epochs, batch_size, lr, seed, device, max_iters, progress)
    meta = {"in_channels": channels, "num_classes": num_classes, "width": width, "size": size,
            "train_acc": acc, "n": len(data), "epochs": epochs}
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}
    atomic_write(out, lambda tmp: torch.save(state, tmp))  # a killed run leaves no half classifier that looks cached
    return out


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


class ClassifierFeatures(nn.Module):
    """A trained SmallResNet as a ClassifierExtractor: (penultimate features, class probabilities)."""

    def __init__(self, file: str | os.PathLike, device: str | torch.device = "cpu"):
        super().__init__()
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"no classifier at {path}: train one with "
                                    f"`python -m sgengine.eval train-classifier --data DIR --out {path}`")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        self.meta = ckpt["meta"]
        self.net = SmallResNet(self.meta["in_channels"], self.meta["num_classes"], self.meta["width"])
        self.net.load_state_dict(ckpt["state_dict"])
        self.net.to(device).eval().requires_grad_(False)
        self.dim, self.num_classes, self.size = self.net.dim, self.meta["num_classes"], self.meta["size"]
        self.name = f"classifier:{path.stem}-{_file_hash(path)}"
        self.description = f"classifier:{path.stem} penultimate features (not Inception)"

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Quantise like a saved PNG (to_uint8_rgb), back to [-1, 1], to the classifier's size and channels."""
        x = to_uint8_rgb(images).to(next(self.net.parameters()).device).float() / 127.5 - 1
        if self.meta["in_channels"] == 1:
            x = x.mean(1, keepdim=True)  # grey inputs were repeated to RGB: the mean restores them exactly
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x

    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(self._prepare(images))
        return f.float(), self.net.head(f).float().softmax(-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self._prepare(images)).float()
