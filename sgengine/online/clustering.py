"""Online Sinkhorn-Knopp clustering of the diffusion model's own features (SPEC section 2).

Paper section 4.2: a mid-block feature f (the CLS token, or every patch token for the patch-level
variant) goes through stop-gradient, a head h_phi = Linear(d, 512) BN ReLU Linear(512, d) and L2
normalisation to z; logits are M z against K bias-free prototypes M (K x d, re-normalised to unit
rows every step, as SwAV). Codes q = Sinkhorn-Knopp(logits) (eqs. 12-13, equipartition over the
batch of all ranks) are targets, and the loss is the swapped-prediction cross-entropy
L_SK = -sum_k q_k log softmax(logits / tau)_k (the SwAV form of eq. 11), averaged over the samples
whose flow time lies in the feature window (t_low, t_high). Eq. 16: the condition of an image is
its argmax prototype m* = argmax_m m^T z.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OnlineConfig
from ..kernels.sinkhorn import sinkhorn
from ..common.io import atomic_write
from ..common.ranks import gather_rows

FEATURES = ("cls", "patches")


def sk_weight(step: int, total: int, sigma: float) -> float:
    """Warm-up weight of L_SK, Algorithm 1 line 18: min(iter / (sigma N), 1)."""
    if sigma * total <= 0:  # no warm-up stage: full weight from the start
        return 1.0
    return min(step / (sigma * total), 1.0)


def feature_time(cfg: OnlineConfig) -> float:
    """t_s of eq. 16: the midpoint of the feature window (authors' code: 0.85 with t = 1 data)."""
    return 0.5 * (cfg.t_low + cfg.t_high)


def check_online(cfg: OnlineConfig) -> None:
    if cfg.feature not in FEATURES:
        raise ValueError(f"online.feature must be one of {FEATURES}, got {cfg.feature!r}")
    if not 0.0 <= cfg.t_low < cfg.t_high <= 1.0:
        raise ValueError(f"need 0 <= online.t_low < online.t_high <= 1, got ({cfg.t_low}, {cfg.t_high})")
    if cfg.prototypes < 2 or cfg.temperature <= 0 or cfg.sk_eps <= 0:
        raise ValueError("need online.prototypes >= 2, online.temperature > 0 and online.sk_eps > 0")
    if not 0.0 <= cfg.stage_switch < 1.0 or not 0.0 <= cfg.p_drop < 1.0:
        raise ValueError("online.stage_switch and online.p_drop must lie in [0, 1)")


class OnlineClustering(nn.Module):
    """Head phi and prototypes M of Algorithm 1; ``loss`` is L_SK, ``assign`` eq. 16."""

    def __init__(self, dim: int, cfg: OnlineConfig):
        super().__init__()
        check_online(cfg)
        self.cfg = cfg
        self.head = nn.Sequential(nn.Linear(dim, cfg.head_hidden), nn.BatchNorm1d(cfg.head_hidden),
                                  nn.ReLU(inplace=True), nn.Linear(cfg.head_hidden, dim))
        self.prototypes = nn.Linear(dim, cfg.prototypes, bias=False)  # rows m_k: logits = M z
        self.normalize_prototypes_()

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Unit-norm prototype rows (SwAV); called after every optimizer step."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    @property
    def vectors(self) -> torch.Tensor:
        """The prototype vectors M (K, d), detached: the condition embeddings of stage 2."""
        return F.normalize(self.prototypes.weight.detach(), dim=1)

    def rows(self, features: dict | torch.Tensor) -> torch.Tensor:
        """Stop-gradient feature rows (n, d): CLS (B, d) or every patch token (B*N, d)."""
        f = features[self.cfg.feature] if isinstance(features, dict) else features
        return f.detach().float().reshape(-1, f.shape[-1])

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """M z with z = normalize(h_phi(f)): cosine scores (n, K)."""
        z = F.normalize(self.head(rows), dim=1)
        return self.prototypes(z)

    @torch.no_grad()
    def assign(self, features: dict | torch.Tensor) -> torch.Tensor:
        """Eq. 16 argmax prototype ids: (B,) for 'cls', (B, N) for 'patches'. Eval-mode head."""
        f = features[self.cfg.feature] if isinstance(features, dict) else features
        was = self.training
        self.eval()  # BN on running statistics: an id must not depend on the rest of the batch
        ids = self.logits(self.rows(f)).argmax(1)
        self.train(was)
        return ids.reshape(f.shape[:-1])

    def in_window(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: flow times inside (t_low, t_high), where L_SK is computed."""
        return (t > self.cfg.t_low) & (t < self.cfg.t_high)

    def loss(self, features: dict | torch.Tensor, t: torch.Tensor, distributed: bool = True) -> torch.Tensor:
        """L_SK over the samples with t in the window; exactly 0 (with a graph) when none is.

        Under torch.distributed (and ``distributed``) every rank passes its own rows and gets the
        L_SK of the rows of ALL ranks: the stop-gradient features are gathered, so the head's BN
        statistics (as SyncBN), the Sinkhorn equipartition (as SwAV's distributed_sinkhorn) and
        the gradients of phi and M are those of one process on the global batch, identical on
        every rank (no gradient all-reduce needed). A collective: every rank must call it.
        """
        keep = self.in_window(t.to(self.prototypes.weight.device))
        f = features[self.cfg.feature] if isinstance(features, dict) else features
        rows = self.rows(f[keep])
        rows = gather_rows(rows) if distributed else rows
        if rows.shape[0] < 2:  # BN needs two rows; Sinkhorn of one row is a constant target
            return self.prototypes.weight.sum() * 0.0
        logits = self.logits(rows)
        q = sinkhorn(logits.detach(), self.cfg.sk_eps, self.cfg.sk_iters, distributed=False)
        return -(q * F.log_softmax(logits / self.cfg.temperature, dim=1)).sum(1).mean()


# -- persistence: clustering.safetensors beside the checkpoint's model / ema weights -------------

CLUSTERING_FILE = "clustering.safetensors"


def save_clustering(ckpt_dir, module: OnlineClustering) -> Path:
    """Head phi, prototypes M and BN statistics into ``ckpt_dir/clustering.safetensors``, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    return atomic_write(Path(ckpt_dir) / CLUSTERING_FILE, lambda tmp: save_file(tensors, str(tmp)))


def load_clustering(ckpt_dir, module: OnlineClustering) -> OnlineClustering:
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / CLUSTERING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {ckpt_dir} was not written by an online self-guidance run "
                                "(train with --online.enabled true), or its write was interrupted; use an earlier "
                                "checkpoint")
    module.load_state_dict(load_file(str(path)))
    return module


@torch.no_grad()
def prototype_ids(net: nn.Module, module: OnlineClustering, x: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 16 for clean images x in [-1, 1]: noise to t_s, one forward with the null condition
    (the paper's c = 0 of the warm-up, which SPEC trains as the learned null token), argmax m^T z."""
    from ..diffusion.flow import flow_path

    t = torch.full((x.shape[0],), feature_time(module.cfg), device=x.device)
    eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    _, feats = net(flow_path(x, eps, t)[0], t, return_features=True)
    return module.assign(feats)


def prototype_cond(module: OnlineClustering, ids: torch.Tensor, device) -> dict:
    """The network's condition for prototype ids. Image level, ids (B,): y = m_id (the prototype
    vector is the condition, cond_dim = d). Patch level, ids (B, N): y_patch = m_id of each patch
    (added to the patch tokens) and y = 0, the paper's zero condition on the condition token."""
    m = module.vectors[ids.to(module.vectors.device)].to(device)
    if ids.dim() == 1:
        return {"y": m}
    return {"y": torch.zeros(m.shape[0], m.shape[-1], device=device), "y_patch": m}
