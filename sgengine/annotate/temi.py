"""TEMI clustering (Adaloglou et al. 2023, BMVC) and the cluster-count upper bound of C-EDM (SPEC section 3).

TEMI trains H heads on frozen features with pairs (x, x') where x' is a random one of x's k cosine
nearest neighbours. A student and an EMA teacher share the head architecture (MLP d -> 512 -> 256,
L2-normalise, weight-normalised linear 256 -> C without bias). With student / teacher
probabilities q_s, q_t (softmax of logits / 0.1) and the cluster prior p_k (an EMA, momentum 0.9, of
the batch-mean teacher probabilities), the loss of a pair is (TEMI eq. 6 / C-EDM eq. 1)

    L(x, x') = - w(x, x') log sum_k (q_s(x)_k q_t(x')_k)^beta / p_k,   beta = 0.6,
    w(x, x') = sum_k q_t(x)_k q_t(x')_k   (no gradient; averaged over heads as in the authors' code),

symmetrised over (x, x') and averaged over the batch; the heads are independent and the one with
the lowest loss gives the clusters (the argmax of its teacher; the loss of the trained teacher over
all pairs, ``final_head_loss``). The teacher momentum rises from
m0 to 1 on a cosine schedule over the total number of steps (DINO's per-step schedule). Optimiser as
in the authors' code: AdamW, linear warm-up then cosine decay, weight decay 1e-4, last layer frozen
for the first epoch.

Schedules that scale with the run: the paper's m0 = 0.996 and lr = 5e-4 per 256 samples are tuned
for runs of ~20k steps (``reference_steps``: CIFAR-scale, ~200 steps x 100 epochs); on a run of
S < 20k steps both are stretched by s = min(20k / S, 25): 1 - m0 = 0.004 s (the teacher's averaging
horizon 1 / (1 - m0) stays S / 80 steps) and lr = 5e-4 s, so that the teacher and the heads travel
as far in a short run as in the paper's. Runs of 20k steps or more use the paper's values; explicit
``momentum`` / ``lr`` override the scaling.

The upper bound (C-EDM section 3.3): utilisation C_u / C for C doubling from ``c_start`` until it
falls below ``threshold``, then every C above the last good doubling step up to the first C below
the threshold; the bound is the largest good C. C_u is the paper's count (clusters that are some
image's argmax) with the clusters the head cannot tell apart counted once (``distinct_clusters``),
because with beta < 1 the argmax count is noise once C exceeds the groups in the data. Found on 8
separated blobs (every point's 50 neighbours in its blob): at C = 32 each blob's teacher
probabilities are 1/4 on each of 4 clusters (mean max probability 0.256, entropy log 4), so each
point's argmax follows its own tiny logit differences and all 32 clusters are "used" (C = 10, 16:
max probability 0.88, 0.50, every cluster again an argmax; C = 8: 1.00). The cause is eq. 6, not the
schedule: for a fixed teacher the student maximises sum_k a_k q_k^beta, a_k = q_t,k^beta / p_k,
strictly concave in q for beta < 1, so mass is shared evenly among clusters of equal a_k (the
optimum is q_k ~ a_k^(1 / (1 - beta))); and as p_k is the teacher's own marginal, a cluster that
takes more of a blob raises its p_k and loses mass again. By this argument (measured at the defaults
only) the even spread over duplicates is stable whatever the temperature, teacher momentum, lr or
run length: it is how TEMI "enforces C_u = C" (C-EDM 3.3; appendix C.1: beta < 1 damps the numerator
that rewards one-hot pairs, at beta = 1 the split is neutral and partial collapse sets in). Counted
once, duplicates leave the bound what TEMI distinguishes: 8 on all six blob settings of
benchmarks/bench_temi_bound.py (C = 9, 16 give C_dist 7.4-8.0). The information count exp I(X; K)
also gives 8 on the blobs but falls with soft boundaries (digits pixels, C = 10: 6.4) where
``distinct_clusters`` gives 8.9 (C = 20: 9.0; the argmax count: 10 and 20).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..eval.cluster import balance
from ..device import resolve_device
from .io import Annotations


@dataclass(frozen=True)
class TEMIConfig:
    heads: int = 16
    hidden: int = 512
    bottleneck: int = 256
    temperature: float = 0.1
    beta: float = 0.6
    momentum: float | None = None  # teacher EMA start, rising to 1; None: scaled to the run (above)
    prior_momentum: float = 0.9
    knn: int = 50
    batch_size: int = 256
    lr: float | None = None  # per 256 samples (linear scaling); None: scaled to the run (above)
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    warmup_epochs: int = 10  # capped at a tenth of the run
    freeze_last_layer_epochs: int = 1
    seed: int = 0
    reference_steps: int = 20_000  # the run length the paper's momentum and lr are tuned for


PAPER_MOMENTUM, PAPER_LR, MAX_STRETCH = 0.996, 5e-4, 25.0


def scaled_schedule(cfg: TEMIConfig, total_steps: int) -> tuple[float, float]:
    """(teacher momentum start m0, lr per 256 samples) for a run of ``total_steps`` (module doc)."""
    stretch = min(max(cfg.reference_steps / max(total_steps, 1), 1.0), MAX_STRETCH)
    momentum = cfg.momentum if cfg.momentum is not None else 1 - (1 - PAPER_MOMENTUM) * stretch
    return momentum, cfg.lr if cfg.lr is not None else PAPER_LR * stretch


def cosine_knn(features: torch.Tensor, k: int = 50, batch_size: int = 1024, progress: bool = False) -> torch.Tensor:
    """Indices (N, k) of each row's k nearest other rows by cosine similarity, in batches of rows."""
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"k-NN needs at least 2 feature rows, got {n}")
    k = min(k, n - 1)
    x = F.normalize(features.float(), dim=1)
    out = torch.empty(n, k, dtype=torch.int64, device=x.device)
    for i in tqdm(range(0, n, batch_size), desc="k-NN", disable=not progress):
        sim = x[i:i + batch_size] @ x.T
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + i] = -float("inf")  # never one's own neighbour, even among duplicates
        out[i:i + batch_size] = sim.topk(k, dim=1).indices
    return out


class TEMIHeads(nn.Module):
    """H independent heads evaluated as batched matmuls: x (B, d) -> logits (H, B, C)."""

    def __init__(self, d: int, clusters: int, heads: int = 16, hidden: int = 512, bottleneck: int = 256):
        super().__init__()
        self.w1 = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, d, hidden), std=0.02))
        self.b1 = nn.Parameter(torch.zeros(heads, 1, hidden))
        self.w2 = nn.Parameter(nn.init.trunc_normal_(torch.empty(heads, hidden, bottleneck), std=0.02))
        self.b2 = nn.Parameter(torch.zeros(heads, 1, bottleneck))
        bound = 1 / math.sqrt(bottleneck)  # nn.Linear's default init of the last layer's direction
        self.v = nn.Parameter(torch.empty(heads, clusters, bottleneck).uniform_(-bound, bound))
        self.g = nn.Parameter(torch.ones(heads, clusters, 1))  # weight-norm gain, starts at 1 (DINO head)

    def last_layer(self) -> list[nn.Parameter]:
        return [self.v, self.g]

    def forward(self, x: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """x (B, d) -> logits (H, B, C) of every head, or of the heads in the slice ``heads``."""
        w1, b1, w2, b2, v, g = (p[heads] for p in (self.w1, self.b1, self.w2, self.b2, self.v, self.g))
        h = F.gelu(torch.baddbmm(b1, x.expand(w1.shape[0], -1, -1), w1))
        z = F.normalize(torch.baddbmm(b2, h, w2), dim=-1)
        w = g * F.normalize(v, dim=-1)  # weight norm: w = g v / ||v|| (Salimans & Kingma 2016)
        return torch.bmm(z, w.transpose(1, 2))


def temi_loss(s1, s2, t1, t2, prior: torch.Tensor, cfg: TEMIConfig):
    """Per-head TEMI loss (H,) of student / teacher logits (H, B, C) of a batch of pairs, and the
    updated prior (H, C). Computed in log space: log sum_k exp(beta (log q_s + log q_t) - log p_k)."""
    tau = cfg.temperature
    with torch.no_grad():
        lt1, lt2 = F.log_softmax(t1 / tau, -1), F.log_softmax(t2 / tau, -1)
        batch = torch.cat([lt1, lt2], dim=1).exp().mean(1)
        prior = cfg.prior_momentum * prior + (1 - cfg.prior_momentum) * batch
        w = _agreement(lt1, lt2).mean(0)  # (B,): teacher agreement of the pair, mean over heads
        log_prior = prior.log()[:, None]

    def pmi(s, lt):
        return _pmi(F.log_softmax(s / tau, -1), lt, log_prior, cfg.beta)

    loss = 0.5 * (w * pmi(s1, lt2)).mean(-1) + 0.5 * (w * pmi(s2, lt1)).mean(-1)
    return loss, prior


def _agreement(lt1: torch.Tensor, lt2: torch.Tensor) -> torch.Tensor:
    """w per head (H, B) = sum_k q_t(x)_k q_t(x')_k, from teacher log-probabilities (H, B, C)."""
    return (lt1 + lt2).exp().sum(-1)


def _pmi(ls: torch.Tensor, lt: torch.Tensor, log_prior: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sum_k (q_s q_t)^beta / p_k per head and pair (H, B), from log-probabilities (eq. 6)."""
    return -torch.logsumexp(beta * (ls + lt) - log_prior, dim=-1)


def _schedules(cfg: TEMIConfig, it: int, total: int, per_epoch: int, batch: int) -> tuple[float, float]:
    """(learning rate, teacher momentum) at step ``it``: linear warm-up + cosine, cosine momentum."""
    warm = min(cfg.warmup_epochs, total // per_epoch // 10) * per_epoch
    m0, lr0 = scaled_schedule(cfg, total)
    base = lr0 * batch / 256
    if it < warm:
        lr = base * (it + 1) / warm
    else:
        lr = cfg.min_lr + (base - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(total - warm, 1)))
    momentum = 1 - (1 - m0) * 0.5 * (1 + math.cos(math.pi * it / total))
    return lr, momentum


@torch.no_grad()
def _ema(teacher: nn.Module, student: nn.Module, m: float) -> None:
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(m).add_(ps.detach(), alpha=1 - m)


@torch.no_grad()
def assign(heads: TEMIHeads, x: torch.Tensor, head: int, batch_size: int = 4096) -> torch.Tensor:
    """Cluster ids (N,) of L2-normalised features x from one head (argmax of its logits)."""
    one = slice(head, head + 1)
    return torch.cat([heads(x[i:i + batch_size], one)[0].argmax(-1) for i in range(0, len(x), batch_size)])


def distinct_clusters(q: torch.Tensor) -> float:
    """C_u of the paper with the clusters a head cannot tell apart counted once, from its cluster
    probabilities q (N, C) over the data: over the clusters that are some row's argmax, with S the
    cosine similarity of their probability columns (S_ab = 1: a and b hold the same rows in the same
    proportions), the participation ratio C_u^2 / sum_ab S_ab^2. Orthogonal columns (hard or
    boundary-soft assignments, any balance) give C_u; a group spread evenly over m duplicate clusters
    counts once (module doc)."""
    q = q.double()
    used = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
    used[q.argmax(-1)] = True
    gram = q[:, used].T @ q[:, used]
    norm = gram.diagonal().sqrt()
    return float(used.sum() ** 2 / (gram / norm[:, None] / norm).square().sum())


@torch.no_grad()
def head_distinct_clusters(heads: TEMIHeads, x: torch.Tensor, tau: float, batch_size: int = 1024) -> list[float]:
    """``distinct_clusters`` of every head over the rows x, one head's (N, C) probabilities at a time."""
    return [distinct_clusters(_log_probs(heads, x, slice(h, h + 1), tau, batch_size)[0][0].exp())
            for h in range(heads.v.shape[0])]


@torch.no_grad()
def final_head_loss(heads: TEMIHeads, x: torch.Tensor, nbrs: torch.Tensor, cfg: TEMIConfig,
                    batch_size: int = 1024, max_bytes: int = 1 << 30) -> torch.Tensor:
    """Per-head TEMI loss (H,) of the trained heads that give the clusters, over every (x, neighbour)
    pair, with p_k their mean probability over the data: the head-selection criterion. The running
    training loss mixes a moving student, an EMA prior and a few noisy batches (on 8 blobs it picked
    a head that merged two blobs over heads that found all eight).

    The heads' log-probabilities over the data are held a group of heads at a time, at most
    ``max_bytes`` (one head at least): (H, N, C) fp32 is 3.2 GB at N=50k, C=1000, H=16. The pair
    weight w averages over every head, so with several groups a first pass gathers it."""
    n_heads, clusters = heads.v.shape[:2]
    per_group = max(1, max_bytes // (4 * len(x) * clusters))
    groups = [slice(h, min(h + per_group, n_heads)) for h in range(0, n_heads, per_group)]
    # One group's tensors live only inside one call below (never two groups at once); a single
    # group is computed once for both passes.
    held = _log_probs(heads, x, groups[0], cfg.temperature, batch_size) if len(groups) == 1 else None
    probs = lambda g: held or _log_probs(heads, x, g, cfg.temperature, batch_size)  # noqa: E731
    # Pass 1: w of each pair, a mean over every head; pass 2: eq. 6 per head with the teacher on
    # both sides (q_s = q_t) and p_k the data mean.
    w = sum(_pair_agreement(probs(g)[0], nbrs, batch_size) for g in groups) / n_heads
    losses = [_pair_loss(*probs(g), w, nbrs, cfg.beta, batch_size) for g in groups]
    return torch.cat(losses) / nbrs.numel()


def _pair_agreement(lt: torch.Tensor, nbrs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """sum over heads of w (N * k,) for every (x, neighbour) pair, from log q (g, N, C)."""
    return torch.cat([_agreement(lt[:, a], lt[:, b]).sum(0) for _, a, b in _pair_blocks(nbrs, batch_size)])


def _pair_loss(lt, log_prior, w, nbrs, beta: float, batch_size: int) -> torch.Tensor:
    """sum over pairs of w * pmi per head (g,), from log q (g, N, C) and log p_k (g, 1, C)."""
    return sum((w[at] * _pmi(lt[:, a], lt[:, b], log_prior, beta)).sum(-1)
               for at, a, b in _pair_blocks(nbrs, batch_size))


def _log_probs(heads: TEMIHeads, x: torch.Tensor, group: slice, tau: float, batch_size: int):
    """log q (g, N, C) of the heads in ``group`` over all of x, filled a batch at a time (no
    second copy), and log p_k (g, 1, C), p_k the mean of q over the data."""
    first = F.log_softmax(heads(x[:batch_size], group) / tau, -1)
    lt = first.new_empty((first.shape[0], len(x), first.shape[2]))
    prob_sum = torch.zeros_like(first[:, 0])
    for i in range(0, len(x), batch_size):
        lt[:, i:i + batch_size] = first if i == 0 else F.log_softmax(heads(x[i:i + batch_size], group) / tau, -1)
        prob_sum += lt[:, i:i + batch_size].exp().sum(1)
    return lt, (prob_sum / len(x)).log()[:, None]


def _pair_blocks(nbrs: torch.Tensor, batch_size: int):
    """(slice of nbrs.reshape(-1), x indices, neighbour indices) of ~batch_size pairs a block."""
    k = nbrs.shape[1]
    rows = max(batch_size // k, 1)
    for i in range(0, len(nbrs), rows):
        a = torch.arange(i, min(i + rows, len(nbrs)), device=nbrs.device).repeat_interleave(k)
        yield slice(i * k, i * k + len(a)), a, nbrs[i:i + rows].reshape(-1)


class _Trainer:
    """One TEMI run: state and the step; ``temi_cluster`` is the entry point."""

    def __init__(self, x: torch.Tensor, clusters: int, nbrs: torch.Tensor, cfg: TEMIConfig):
        self.x, self.nbrs, self.cfg = x, nbrs, cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.student = TEMIHeads(x.shape[1], clusters, cfg.heads, cfg.hidden, cfg.bottleneck).to(x.device)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=0.0, weight_decay=cfg.weight_decay)  # set per step
        self.prior = torch.full((cfg.heads, clusters), 1 / clusters, device=x.device)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def pairs(self, idx: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(self.nbrs.shape[1], (len(idx),), generator=self.gen).to(idx.device)
        return self.nbrs[idx, pick]

    def step(self, idx: torch.Tensor, lr: float, momentum: float, freeze_last: bool) -> torch.Tensor:
        x1, x2 = self.x[idx], self.x[self.pairs(idx)]
        with torch.no_grad():
            t1, t2 = self.teacher(x1), self.teacher(x2)
        head_loss, self.prior = temi_loss(self.student(x1), self.student(x2), t1, t2, self.prior, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        head_loss.sum().backward()  # heads are independent: the sum trains each on its own loss
        if freeze_last:
            for p in self.student.last_layer():
                p.grad = None
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        _ema(self.teacher, self.student, momentum)
        return head_loss.detach()

    def fit(self, epochs: int, progress: bool, settle: int = 0) -> list[torch.Tensor]:
        """Train; returns the mean loss per head (H,) of every epoch. settle > 0: stop once every
        head's ``distinct_clusters`` has moved by less than half a cluster over ``settle`` epochs
        (checked after the lr warm-up; the schedules keep the full run's length)."""
        n, batch = len(self.x), min(self.cfg.batch_size, len(self.x))
        per_epoch, history, counts = math.ceil(n / batch), [], []
        start = max(min(self.cfg.warmup_epochs, epochs // 10), self.cfg.freeze_last_layer_epochs)
        bar = tqdm(range(epochs), desc=f"TEMI C={self.prior.shape[1]}", disable=not progress)
        for epoch in bar:
            perm, total = torch.randperm(n, generator=self.gen).to(self.x.device), 0
            for j in range(per_epoch):
                lr, m = _schedules(self.cfg, epoch * per_epoch + j, epochs * per_epoch, per_epoch, batch)
                freeze = epoch < self.cfg.freeze_last_layer_epochs
                total = total + self.step(perm[j * batch:(j + 1) * batch], lr, m, freeze)
            history.append((total / per_epoch).cpu())
            bar.set_postfix(loss=f"{float(history[-1].min()):.4f}")
            if settle and epoch >= start and self.settled(counts, settle):
                break
        return history

    def settled(self, counts: list[torch.Tensor], window: int) -> bool:
        """Appends every head's ``distinct_clusters`` (on at most 2048 fixed random rows) and says whether none moved
        by half a cluster or more over the last ``window`` epochs."""
        rows = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(0))[:2048].to(self.x.device)
        counts.append(torch.tensor(head_distinct_clusters(self.teacher, self.x[rows], self.cfg.temperature)))
        return len(counts) > window and bool((counts[-1] - counts[-1 - window]).abs().max() < 0.5)


def temi_cluster(features: torch.Tensor, clusters: int, epochs: int = 100, cfg: TEMIConfig = TEMIConfig(),
                 knn: torch.Tensor | None = None, device=None, progress: bool = True,
                 settle: int = 0) -> tuple[torch.Tensor, dict]:
    """TEMI on (N, d) features into ``clusters`` clusters -> (ids (N,) int64 CPU, info).

    info: 'head' (the best head), 'head_loss' (``final_head_loss`` per head), 'loss' (best head's
    mean training loss per epoch; its length is the epochs run), 'used' / 'utilisation' / 'kl_uniform'
    of the argmax ids, 'distinct' (``distinct_clusters`` of the best head) and 'distinct_utilisation'
    (distinct / clusters). knn: precomputed (N, k) neighbour indices (re-used across runs by the bound
    search). settle: stop early once the counts settle (``_Trainer.fit``). device: default CUDA when
    available."""
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf; check the extractor or the input images")
    if clusters < 1 or epochs < 1 or settle < 0:
        raise ValueError(f"need clusters >= 1, epochs >= 1 and settle >= 0, got clusters={clusters}, "
                         f"epochs={epochs}, settle={settle}")
    x = F.normalize(features.float(), dim=1).to(resolve_device(device, features.device))
    nbrs = (cosine_knn(x, cfg.knn) if knn is None else knn).to(x.device)
    run = _Trainer(x, clusters, nbrs, cfg)
    history = run.fit(epochs, progress, settle)
    final = final_head_loss(run.teacher, x, nbrs, cfg)
    head = int(final.argmin())
    ids = assign(run.teacher, x, head).cpu()
    distinct = distinct_clusters(_log_probs(run.teacher, x, slice(head, head + 1), cfg.temperature, 1024)[0][0].exp())
    info = {"head": head, "head_loss": final.tolist(), "loss": [float(h[head]) for h in history],
            **balance(ids.numpy(), clusters), "distinct": distinct, "distinct_utilisation": distinct / clusters}
    return ids, info


def cluster_count_bound(features: torch.Tensor, threshold: float = 0.9, c_start: int = 2, c_max: int = 4096,
                        epochs: int = 50, cfg: TEMIConfig = TEMIConfig(), step: int = 1, device=None,
                        progress: bool = True, log=print, settle: int = 5) -> tuple[int, list[dict]]:
    """Upper bound on the useful number of clusters (C-EDM section 3.3) and the table it used.

    threshold: the utilisation C_u / C that counts as "all clusters used", C_u the distinct count
    (module doc); 0.9 is our default (tune it per data set). As the paper: TEMI runs at c_start,
    2 c_start, ... <= c_max until the utilisation first falls below the threshold (at C_bad), then at
    every ``step``-th C above the last good doubling step, up to the first C below the threshold
    (so at most C_bad / 2 runs more; on 8 blobs C = 9 already is: 8 / 9). The bound is the largest C
    whose utilisation is >= threshold. If even c_start is below the threshold the grid starts at 2
    (C = 1 is always fully used). Each run stops early once its counts settle (``settle`` epochs, 0:
    never; ``_Trainer.fit``). Returns (bound, rows sorted by C, each {'C', 'C_u' (argmax count),
    'C_dist', 'ratio' (C_dist / C), 'epochs' (run)}) and logs the table."""
    if not 0 < threshold <= 1 or not 1 <= c_start <= c_max or step < 1:
        raise ValueError(f"need 0 < threshold <= 1, 1 <= c_start <= c_max, step >= 1; got "
                         f"threshold={threshold}, c_start={c_start}, c_max={c_max}, step={step}")
    c_max = min(c_max, len(features))
    knn = cosine_knn(features.to(resolve_device(device, features.device)), cfg.knn)
    table: dict[int, dict] = {}

    def good(c: int) -> bool:
        _, info = temi_cluster(features, c, epochs, cfg, knn, device, progress, settle)
        table[c] = {"C": c, "C_u": info["used"], "C_dist": info["distinct"], "ratio": info["distinct_utilisation"],
                    "epochs": len(info["loss"])}
        return table[c]["ratio"] >= threshold

    lo, bad, c = 1, None, min(c_start, c_max)
    while bad is None:
        lo, bad = (c, None) if good(c) else (lo, c)
        if c >= c_max:
            break
        c = min(2 * c, c_max)
    for c in range(lo + step, bad if bad is not None else lo, step):
        if not good(c):
            break
    bound = max([1] + [r["C"] for r in table.values() if r["ratio"] >= threshold])
    rows = [table[k] for k in sorted(table)]
    log(format_table(rows, threshold, bound))
    return bound, rows


def format_table(rows: list[dict], threshold: float, bound: int) -> str:
    lines = [f"{'C':>7} {'C_u':>7} {'C_dist':>7} {'C_dist/C':>7} {'epochs':>7}"]
    lines += [f"{r['C']:>7} {r['C_u']:>7} {r['C_dist']:>7.2f} {r['ratio']:>7.3f} {r['epochs']:>7}"
              f"{'  <- bound' if r['C'] == bound else ''}" for r in rows]
    return "\n".join(lines + [f"upper bound on the number of clusters: {bound} (C_dist / C >= {threshold})"])


def temi_annotations(features: torch.Tensor, k: int, settings: dict, epochs: int = 100,
                     cfg: TEMIConfig = TEMIConfig(), device=None, progress: bool = True) -> Annotations:
    """Self-labels from TEMI's best head (C-EDM's cluster conditioning, SPEC section 3)."""
    ids, info = temi_cluster(features, k, epochs, cfg, device=device, progress=progress)
    steps = epochs * math.ceil(len(features) / min(cfg.batch_size, len(features)))
    m0, lr = scaled_schedule(cfg, steps)
    temi = {"head": info["head"], "final_loss": info["loss"][-1], "epochs": epochs, **dataclasses.asdict(cfg),
            "steps": steps, "momentum_start": m0, "lr_per_256": lr}
    return Annotations(ids, k, settings={**settings, "temi": temi})
