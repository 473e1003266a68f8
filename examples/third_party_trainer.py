"""A plain training loop that embeds sgengine, as a user would: a diffusers ``UNet2DModel`` trained on
scikit-learn's digits with sgengine's self-labels, loss, EMA, CFG, SAG and samplers, through the
documented top-level exports of ``import sgengine as sg`` only.

    python examples/third_party_trainer.py --steps 300 --out runs/third_party   # minutes on a free CPU
    python examples/third_party_trainer.py --tiny                               # the CI smoke run

It writes one grid per sampler (DDIM, Heun, Euler under CFG + SAG; rows = self-label clusters) and
prints the self-labels' agreement with the true digits.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from sklearn.datasets import load_digits

import sgengine as sg


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as floats in [-1, 1], (N, 1, size, size), and their true labels."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False), torch.tensor(d.target)


def unet(size: int, k: int) -> UNet2DModel:
    """A tiny class-conditional diffusers UNet; class id k is the learned null condition (CFG)."""
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=k + 1)


def train(args) -> None:
    torch.manual_seed(args.seed)
    x, truth = digits(args.size)
    # Self-labels: spherical k-means on the L2-normalised pixels; no true label is used for training.
    labels = sg.kmeans(F.normalize(x.flatten(1), dim=1), args.k, spherical=True, seed=args.seed)[1]
    print(sg.format_report(sg.cluster_report(labels, args.k, truth)))
    net = sg.DiffusersDenoiser(unet(args.size, args.k), null_label=args.k)  # net(x_t, t, y=ids, null=mask)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
    loss_fn, ema = sg.EpsilonLoss(), sg.EMA(net, max_decay=0.999)
    for step in range(args.steps):
        idx = torch.randint(len(x), (args.batch,))
        drop = torch.rand(args.batch) < 0.1  # classifier-free guidance: the null condition 10% of the time
        loss = loss_fn(net, x[idx], y=labels[idx], null=drop).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net)
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}")
    sample(ema.module, args)


def sample(net, args) -> None:
    gen = sg.Generator.of(net, sg.parameterization_for("ddpm"), (1, args.size, args.size), num_classes=args.k,
                          class_ids=True, clip_x0=True)  # x0 estimates clamped to [-1, 1] by every sampler
    rows = list(range(min(args.k, 4)))
    ids = torch.tensor(rows).repeat_interleave(args.per_row)
    out = Path(args.out)
    for name in ("ddim", "heun", "euler"):
        imgs = sg.sample(gen, ids, w=2.0, steps=args.sample_steps, sampler=name, seed=args.seed,
                         sag_scale=0.75, sag_blur=(3, 1.0))
        assert torch.isfinite(imgs).all()
        path = sg.save_grid(imgs, len(rows), out / f"samples_{name}.png", scale=4)
        print(f"{name}: wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--per_row", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/third_party")
    p.add_argument("--tiny", action="store_true", help="a smoke run: 20 steps, 3 sampling steps")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.sample_steps, args.per_row = 20, 16, 3, 2
    train(args)


if __name__ == "__main__":
    main()
