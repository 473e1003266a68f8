"""Feature extractors g for self-annotation (SPEC section 1: "feature extractor g, then f").

Every extractor maps a batch of uint8 images (B, C, H, W) and their row indices (B,) to a dict of
tensors; ``extract`` runs one over a whole data set in batches (on the GPU when there is one), with
a tqdm bar, and caches the result in a safetensors file keyed by a hash of the extractor's settings
and the data. Keys of the dict:

- ``cls``     (N, D): the global feature (the CLS token of a ViT; pixels or their PCA; the mean-
               pooled block output of a diffusion model) -> self-labels, TEMI, STEGO's k-NN;
- ``patches`` (N, P, D) float16: patch features on the model's patch grid -> STEGO;
- ``keys``    (N, P, D) float16: the last attention block's keys of the patch tokens -> LOST
               (Simeoni et al. 2021, section 3.1 use the keys of the last layer);
- ``grid``    (2,) int64: the patch grid (rows, cols); patch p sits at (p // cols, p % cols).

Extractors: ``ViTExtractor`` (any timm ViT, e.g. ``vit_small_patch16_224.dino``), ``PixelExtractor``
(pixels / PCA, from pixels.py) and ``DiffusionExtractor`` (a trained sgengine checkpoint's own
features, as in the online self-guidance paper's offline variant, SPEC section 2).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..device import resolve_device
from ..common.io import atomic_write
from .pixels import pixel_features

PATCH_DTYPE = torch.float16  # patch-level tensors are N x P x D: half the memory, ample for affinities


# ------------------------------------------------------------------------------------------ ViT

def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch.save file; unreadable files get a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}: pass --weights FILE (a .pth or .safetensors state dict)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors and EOF errors all mean "not a state dict"
        raise ValueError(f"cannot read weights file {path}: not a readable torch.save or safetensors state dict "
                         f"({type(err).__name__}; corrupt or truncated?). Re-download it, or save one with "
                         "torch.save(model.state_dict(), path)") from err


def unwrap_checkpoint(raw: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a timm state dict or a DINO checkpoint.

    DINO's training checkpoints hold {'teacher': {'module.backbone.blocks...'}} (its released
    *_pretrain.pth files already use timm's key layout); 'head.' is DINO's projection head."""
    for key in ("teacher", "state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError("the weights file holds no state dict of tensors: save model.state_dict()")
    out = {}
    for k, v in raw.items():
        for prefix in ("module.", "backbone."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if not k.startswith("head."):
            out[k] = v
    return out


def load_vit_weights(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a local file into a timm ViT; timm's filter remaps layouts and resizes position embeddings."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = unwrap_checkpoint(read_state_dict(path))
    try:
        missing, _ = model.load_state_dict(checkpoint_filter_fn(sd, model), strict=False)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"the weights in {path} do not fit timm model {name!r} (another model size or patch "
                         f"size?): {str(err)[:300]}") from err
    if missing:
        raise ValueError(f"the weights in {path} lack {len(missing)} tensors of timm model {name!r} "
                         f"(e.g. {missing[:3]}): pass the --extractor name that matches the file, "
                         "e.g. vit_base_patch16_224.dino for DINO ViT-B/16")


def _file_identity(path) -> dict:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


class ViTExtractor(nn.Module):
    """A timm ViT: CLS token, patch tokens (after the final norm) and last-block keys of the patches.

    weights: None = timm's pretrained weights from the hub (online only); a path = a local state
    dict (.pth / .safetensors, timm's or DINO's layout); "random" = random initialisation from
    ``seed`` (the seed is in ``settings``, hence in the feature-cache key).
    img_size: the model's input size (default: the model's own, e.g. 224); images are resized to it
    (bicubic, antialiased) and normalised with the model's mean / std; grey is repeated to RGB.
    """

    def __init__(self, name: str, weights: str | os.PathLike | None = None, img_size: int | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, **model_kwargs):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # timm initialises from the global generator
            torch.manual_seed(seed)
            self.model = self._create(name, weights, img_size, model_kwargs).eval().requires_grad_(False)
        self.size = tuple(self.model.patch_embed.img_size)
        self.grid = tuple(self.model.patch_embed.grid_size)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}  # models built outside timm's registry have none
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.settings = {"extractor": name, "img_size": list(self.size), "model_kwargs": model_kwargs,
                         "weights": "hub" if weights is None else {"random": seed} if weights == "random"
                         else _file_identity(weights)}
        self._keys = None
        qkv = getattr(getattr(self.model.blocks[-1], "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear):
            raise ValueError(f"timm model {name!r} has no fused qkv linear in its last block; "
                             "LOST's keys need a timm VisionTransformer (e.g. vit_small_patch16_224.dino)")
        qkv.register_forward_hook(self._keep_keys)
        self.to(device)

    @staticmethod
    def _create(name, weights, img_size, kwargs) -> nn.Module:
        try:
            import timm
        except ImportError as err:
            raise ImportError("ViT features need timm: pip install timm (or pip install sgengine[timm])") from err
        kw = dict(kwargs, num_classes=0, **({"img_size": img_size} if img_size else {}))
        if weights is None:
            try:
                return timm.create_model(name, pretrained=True, **kw)
            except OSError as err:
                raise RuntimeError(f"cannot fetch pretrained weights of {name!r} from the hub ({err}); offline? "
                                   "download them on a machine with network and pass --weights FILE") from err
        model = timm.create_model(name, pretrained=False, **kw)
        if weights != "random":
            load_vit_weights(model, weights, name)
        return model

    def _keep_keys(self, module, inputs, out) -> None:
        d = out.shape[-1] // 3  # timm's qkv output is [q | k | v], heads contiguous within each
        self._keys = out[..., d:2 * d]

    def forward(self, images: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x = images.to(self.mean.device).float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]
        x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        tokens = self.model.forward_features((x.clamp(0, 1) - self.mean) / self.std)
        n = self.model.num_prefix_tokens
        return {"cls": self.model.forward_head(tokens, pre_logits=True), "patches": tokens[:, n:],
                "keys": self._keys[:, n:]}


# --------------------------------------------------------------------------------------- pixels

class PixelExtractor(nn.Module):
    """Pixels as features: the global feature is the flattened image (or its PCA, dataset-wide,
    so it is computed in ``finish``), patch features are non-overlapping p x p pixel patches, and
    LOST's keys are the patches centred on the image's mean patch (so "positive affinity" means
    "more alike than average", which gives LOST a sign to work with)."""

    def __init__(self, patch: int = 4, pca_dim: int | None = None):
        super().__init__()
        self.patch, self.pca_dim = patch, pca_dim
        self.settings = {"extractor": f"pca{pca_dim}" if pca_dim else "pixels", "patch": patch}
        self.grid = None

    def forward(self, images: torch.Tensor, index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        p = self.patch
        if images.shape[-1] % p or images.shape[-2] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the pixel patch {p}: "
                             "pass --patch that divides --size")
        x = images.float() / 127.5 - 1
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, P, C p p)
        self.grid = (images.shape[-2] // p, images.shape[-1] // p)
        return {"patches": patches, "keys": patches - patches.mean(1, keepdim=True)}

    def finish(self, out: dict, images: torch.Tensor) -> None:
        out["cls"] = pixel_features(images, self.pca_dim)


# ------------------------------------------------------------------------------------ diffusion

def _raw_network(net: nn.Module) -> nn.Module:
    """The UNet / U-ViT inside objective wrappers (EDMPrecond, TimeScale keep it as .net)."""
    from ..models.unet import UNet
    from ..models.uvit import UViT

    while not isinstance(net, (UNet, UViT)) and isinstance(getattr(net, "net", None), nn.Module):
        net = net.net
    return net


def _blocks(raw: nn.Module) -> list[nn.Module]:
    """Blocks in forward order, addressable by index: UNet down levels, mid, up levels; U-ViT blocks."""
    if hasattr(raw, "in_blocks"):
        return [*raw.in_blocks, raw.mid_block, *raw.out_blocks]
    return [*raw.down, raw.mid, *raw.up]


def find_block(raw: nn.Module, layer: int | str) -> nn.Module:
    """A block by index into ``_blocks`` (negative allowed, 'mid' = the middle) or by module name."""
    blocks = _blocks(raw)
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if layer == "mid":
        return raw.mid_block if hasattr(raw, "mid_block") else raw.mid
    if isinstance(layer, int):
        if not -len(blocks) <= layer < len(blocks):
            raise ValueError(f"layer {layer} is out of range: this network has {len(blocks)} blocks (0..{len(blocks) - 1})")
        return blocks[layer]
    modules = dict(raw.named_modules())
    if layer not in modules:
        raise ValueError(f"no module {layer!r} in the network; use a block index 0..{len(blocks) - 1}, 'mid', "
                         f"or a name such as {[n for n in modules if n.count('.') == 1][:6]}")
    return modules[layer]


DEFAULT_T = {"ddpm": 200, "flow": 0.8, "edm": 0.5}  # ddpm: timestep; flow: time (1 = data); edm: sigma


class DiffusionExtractor(nn.Module):
    """A trained sgengine model's own features: noise x to level t, one forward with the null
    condition, and read the chosen block's output through a forward hook.

    t follows the checkpoint's objective: ddpm an integer timestep in [0, T) (q_sample, DDPM eq. 4;
    default 200 as in SPEC section 5), flow a time in [0, 1] with 1 = data (default 0.8, the
    paper's 0.2 in its reversed convention), edm a noise level sigma (default 0.5). The noise of
    image i comes from a generator seeded with (seed, i), so features do not depend on batching.
    """

    def __init__(self, run_dir: str | os.PathLike, layer: int | str = "mid", t: float | None = None,
                 seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__()
        from ..sampling import load_generator
        from ..checkpoint import resolve_checkpoint

        gen = load_generator(run_dir, device)
        self.net, self.cfg, self.seed = gen.net.requires_grad_(False), gen.cfg, seed
        self.objective = self.cfg.objective
        self.t = DEFAULT_T[self.objective] if t is None else t
        self._check_t()
        self.raw = _raw_network(self.net)
        m = self.cfg.uvit if self.cfg.arch == "uvit" else self.cfg.model
        self.channels, self.size = m.in_channels, (m.img_size, m.img_size)  # (H, W), as ViTExtractor's
        find_block(self.raw, layer).register_forward_hook(self._keep)
        self._out, self.grid = None, None
        ckpt = resolve_checkpoint(run_dir)
        self.settings = {"extractor": "diffusion", "run": _file_identity(ckpt / "ema.safetensors"),
                         "layer": str(layer), "t": self.t, "seed": seed}

    def _check_t(self) -> None:
        ok = {"ddpm": float(self.t).is_integer() and 0 <= self.t < self.cfg.T,
              "flow": 0 <= self.t <= 1, "edm": self.t > 0}[self.objective]
        if not ok:
            raise ValueError(f"t={self.t} does not fit objective {self.objective!r}: ddpm takes a timestep in "
                             f"[0, {self.cfg.T}), flow a time in [0, 1] (1 = data), edm a sigma > 0")

    def _keep(self, module, inputs, out) -> None:
        self._out = out[0] if isinstance(out, tuple) else out

    def _noise(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        g = torch.Generator()
        eps = [torch.randn(x.shape[1:], generator=g.manual_seed(self.seed * 1_000_003 + int(i))) for i in index]
        return torch.stack(eps).to(x.device)

    def _noised(self, x: torch.Tensor, eps: torch.Tensor):
        """(x_t, the network's time input) at level t for this objective."""
        tt = torch.full((x.shape[0],), float(self.t), device=x.device)
        if self.objective == "ddpm":
            from ..diffusion.ddpm import q_sample
            from ..diffusion.schedules import alphas_cumprod, linear_betas

            abar = alphas_cumprod(linear_betas(self.cfg.T, self.cfg.beta_start, self.cfg.beta_end))
            return q_sample(x, tt.long(), eps, abar), tt
        if self.objective == "flow":
            from ..diffusion.flow import flow_path
            return flow_path(x, eps, tt)[0], tt
        return x + self.t * eps, tt

    def forward(self, images: torch.Tensor, index: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[1] != self.channels:
            raise ValueError(f"the diffusion model takes {self.channels}-channel images, got {images.shape[1]}: "
                             f"load the data with channels={self.channels}")
        x = images.to(next(self.net.parameters()).device).float() / 127.5 - 1
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        self.net(*self._noised(x, self._noise(x, index)))  # y=None: the null condition
        h = self._out
        if h.dim() == 4:  # UNet: (B, C, H, W)
            self.grid = tuple(h.shape[-2:])
            patches = h.flatten(2).transpose(1, 2)
        else:  # U-ViT: (B, extras + P, d), patch tokens last
            patches = h[:, -self.raw.cfg.num_patches:]
            side = int(round(patches.shape[1] ** 0.5))
            self.grid = (side, patches.shape[1] // side)
        return {"cls": patches.mean(1), "patches": patches}


# ------------------------------------------------------------------------------------ factory

def make_extractor(spec: str, weights=None, img_size: int | None = None, layer: int | str = "mid",
                   t: float | None = None, pca_dim: int = 64, patch: int = 4, device="cpu",
                   seed: int = 0) -> nn.Module:
    """'pixels' | 'pca' | 'diffusion:<run_dir>' | a timm model name; ``seed``: the random init of
    a ViT with weights="random"."""
    if spec == "pixels":
        return PixelExtractor(patch)
    if spec == "pca":
        return PixelExtractor(patch, pca_dim)
    if spec.startswith("diffusion:"):
        return DiffusionExtractor(spec.split(":", 1)[1], layer, t, seed=seed, device=device)
    return ViTExtractor(spec, weights, img_size, device, seed=seed)


# ------------------------------------------------------------------------------------ extract

def cache_key(extractor, images: torch.Tensor, names: list[str] | None, keep) -> str:
    """Hash of (extractor settings, data size, image names or, without names, the pixels)."""
    h = hashlib.sha256(json.dumps(extractor.settings, sort_keys=True, default=str).encode())
    h.update(repr((tuple(images.shape), sorted(keep) if keep else None)).encode())
    h.update("\n".join(names).encode() if names else images.contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _device_of(module: nn.Module) -> torch.device:
    t = next(iter((*module.parameters(), *module.buffers())), None)
    return t.device if t is not None else torch.device("cpu")


def _run(extractor, images: torch.Tensor, batch_size: int, keep, progress: bool) -> dict:
    device, parts = _device_of(extractor), {}
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress):
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            out = extractor(batch, torch.arange(start, start + len(batch)))
            for k, v in out.items():
                if keep is None or k in keep:
                    parts.setdefault(k, []).append(v.to(PATCH_DTYPE if v.dim() == 3 else torch.float32).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def extract(extractor: nn.Module, images: torch.Tensor, batch_size: int = 64, device=None,
            progress: bool = True, cache: str | os.PathLike | None = None, names: list[str] | None = None,
            keep: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Features of all images (uint8 (N, C, H, W)) as CPU tensors (see the module doc for keys).

    device: where to run (default: CUDA when available, else the extractor's device).
    cache: a folder; the result is stored as features-<hash>.safetensors and re-used when the
    extractor settings, data size and image names (or pixels) match. keep: the keys to keep.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(cache) / f"features-{cache_key(extractor, images, names, keep)}.safetensors" if cache else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file
        return load_file(str(path))
    extractor.to(resolve_device(device, _device_of(extractor)))
    out = _run(extractor, images, batch_size, keep, progress)
    if hasattr(extractor, "finish") and (keep is None or "cls" in keep):
        extractor.finish(out, images)
    out["grid"] = torch.tensor(extractor.grid, dtype=torch.int64)
    if path is not None:
        _save_atomic(path, out)
    return out


def _save_atomic(path: Path, out: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in out.items()}, str(tmp)))
