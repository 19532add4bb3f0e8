"""
Learning Independent (Causal) Mechanisms, in one file.

Paper: Giambattista Parascandolo, Niki Kilbertus, Mateo Rojas-Carulla, Bernhard Schoelkopf,
"Learning Independent Causal Mechanisms", ICML 2018, arXiv:1712.00961.

The idea:
- Two unpaired sets of images: X from a reference distribution P (canonical MNIST digits) and X'
  from a transformed one Q, each image of X' having gone through one of N unknown mechanisms
  (a shift, a contrast inversion, noise). Nothing says which image went through which mechanism,
  and no image of X' comes with its original.
- N' experts E_j each map an image to an image. They start as (about) the identity on X'.
- A discriminator D scores how much an image looks like it was drawn from P. Every image of X' goes
  through every expert; the expert whose output D scores highest wins the image and only it is
  trained on it, to raise that score. D learns to tell X from the output of every expert.
- Competition drives specialisation: an expert slightly better at undoing one mechanism wins more
  of its images, is trained on them and gets better at it, so it wins more of them; in the end each
  expert inverts one mechanism and can be applied alone, to other data (paper Figure 8: Omniglot).

Algorithm 1 of the paper (the slides show it) -> code
    line 1  E_j <- TrainAsIdentityOn(X')                  identity_loss   (the first identity_iters steps)
    line 3  x, x' <- Sample(X), Sample(X')                 real, x          (B, c, H, W) each
    line 4  c_j <- D(E_j(x'))                               scores           (B, N') logits: c_j = sigmoid(scores)
    line 5  D ascends log D(x) + 1/N' sum_j log(1 - c_j)   discriminator_loss
    line 6  E_j* ascends log c_j*, j* = argmax_j c_j        expert_loss      (per sample, winner only)

Paper symbol -> variable -> shape  (B batch, N' = num_experts, c = in_channels, H = W = image_size)
    E_j(x')             outputs           (B, N', c, H, W), every expert's output, in [0, 1] (sigmoid)
    D(.)                discriminator     image (.., c, H, W) -> logit (..,); D = sigmoid(logit)
    c_j                 scores            (B, N') logits of D on every expert's output
    j*                  winner            (B,) the expert each sample goes to

How it is built, and where the paper is silent:
- The N' experts are one grouped convolution stack (expert j owns channel group j), so a forward
  pass runs them all at once with no loop over experts. Each is expert_layers 3 x 3 convolutions,
  ELU and batch norm between them, a sigmoid at the end (the paper: five layers of 32 filters, ELU,
  batch norm; a 4 px shift needs at least four 3 x 3 layers of receptive field to be undone).
- The discriminator: 3 x 3 convolutions with ELU, an average pooling after every two, then a hidden
  fully connected layer (the paper: "growing number of filters", 1024 hidden units). No batch norm,
  so its score of one image does not depend on the rest of the batch.
- updates 'joint' (the default): one optimiser step does lines 5 and 6 together: the loss is
  discriminator_loss + expert_loss, with D seeing the experts' outputs detached (line 5 trains D only),
  and expert_loss computed by a copy of D whose parameters are detached (line 6 trains the experts
  only). Adam is per parameter, so this is two Adams with the same settings run in the same step, both
  on the D of before the step. The winners come from the same scores D is trained on.
  updates 'alternate': the paper's loop order, line 5 then line 6, as two optimiser steps: even steps
  (after the identity phase) train D only, odd steps train the winners only, scored and chosen by the D
  of the step before. A parameter without a gradient is left alone by Adam, so each network moves only
  at its own steps; a run needs twice the steps for as many updates of each.
- Every expert runs on the whole batch without gradient (to be scored; batch norm's statistics are per
  expert over the batch, as in the public code), then each image runs again through its winner only,
  with gradient, normalised with its expert's statistics of the first pass (constants here). So an
  expert gets gradient only from the images it won, at the cost of one expert per image. Adam's
  momentum still moves an expert for a few steps after it stops winning.
- The expert loss is the non-saturating -log c_j* (line 6 ascends log c_j*), from logits (log-sigmoid).
- At test time (eval mode) the output for each image is the winner's: the expert D scores highest.
- On a CPU, call torch.set_flush_denormal(True) before training (train.py does): on MNIST's black
  backgrounds the experts produce subnormal floats, which made a training step 2.5x slower here.

Reproduce (docs/lim.md): python reproduce.py lim_mnist --data_root DIR
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LIMConfig:
    image_size: int = 28  # sized by the task
    in_channels: int = 1  # sized by the task
    num_experts: int = 10  # N': as many as the mechanisms (paper, section 4: ten on MNIST)
    expert_layers: int = 5  # paper: five 3 x 3 convolutional layers
    expert_channels: int = 32  # paper: 32 filters each
    expert_batch_norm: bool = True  # paper: batch normalisation (between the layers)
    disc_channels: tuple = (16, 16, 32, 32)  # paper: growing filters, average pooling every two layers
    disc_hidden: int = 1024  # paper: a fully connected layer of 1024 as the last hidden layer
    identity_iters: int = 500  # Algorithm 1, line 1: steps of training every expert as the identity on X'
    updates: str = "joint"  # 'joint': lines 5 and 6 in one step; 'alternate': a D step (line 5), then an expert step (6)

    def __post_init__(self):
        if self.num_experts < 1 or self.expert_layers < 2 or self.expert_channels < 1:
            raise ValueError("need num_experts >= 1, expert_layers >= 2 and expert_channels >= 1")
        if self.updates not in ("joint", "alternate"):
            raise ValueError(f"updates must be 'joint' or 'alternate', got {self.updates!r}")
        if not self.disc_channels or self.disc_hidden < 1 or self.identity_iters < 0:
            raise ValueError("need disc_channels, disc_hidden >= 1 and identity_iters >= 0")
        if self.image_size % (2 ** ((len(self.disc_channels) + 1) // 2)):
            raise ValueError(f"image_size {self.image_size} must halve {(len(self.disc_channels) + 1) // 2} "
                             "times (one average pooling every two discriminator layers)")


class Experts(nn.Module):
    """N' convolutional experts, their weights stacked on a leading expert axis. Run on every image with
    every expert, they are one grouped convolution per layer (group j is expert j); run with one expert
    per image (each image's winner), one grouped convolution per layer whose group i holds image i's
    expert's weights. No loop over experts either way."""

    def __init__(self, config):
        super().__init__()
        n, c, width = config.num_experts, config.in_channels, config.expert_channels
        self.widths = [c] + [width] * (config.expert_layers - 1) + [c]
        self.num_experts, self.batch_norm = n, config.expert_batch_norm
        pairs = list(zip(self.widths, self.widths[1:]))
        # nn.Conv2d's default init, per expert: uniform in +-1 / sqrt(fan_in) for weights and biases
        bound = lambda a: 1 / math.sqrt(9 * a)
        self.weight = nn.ParameterList(nn.Parameter(torch.empty(n, b, a, 3, 3).uniform_(-bound(a), bound(a))) for a, b in pairs)
        self.bias = nn.ParameterList(nn.Parameter(torch.empty(n, b).uniform_(-bound(a), bound(a))) for a, b in pairs)
        hidden = len(pairs) - 1  # batch norm after every layer but the last
        self.norm_weight = nn.ParameterList(nn.Parameter(torch.ones(n, width)) for _ in range(hidden * self.batch_norm))
        self.norm_bias = nn.ParameterList(nn.Parameter(torch.zeros(n, width)) for _ in range(hidden * self.batch_norm))
        for layer in range(hidden * self.batch_norm):
            self.register_buffer(f"running_mean{layer}", torch.zeros(n, width))
            self.register_buffer(f"running_var{layer}", torch.ones(n, width))

    def forward(self, x, winner=None, stats=None):
        """x (B, c, H, W) in [0, 1].
        winner None: every expert's output (B, N', c, H, W) in [0, 1], and the batch statistics of each batch
        norm (per expert, over the batch; running statistics in eval mode) as a list of (mean, var) (N', width).
        winner (B,) with stats: image i through expert winner[i] only, normalised with its expert's statistics
        in stats (constants here) -> (B, c, H, W)."""
        B, c, H, W = x.shape
        n, last = self.num_experts, len(self.weight) - 1
        routed = winner is not None
        groups = B if routed else n
        # (1, B c, H, W): image i is group i; or (B, N' c, H, W): each expert's group reads the same image
        h = x.reshape(1, B * c, H, W) if routed else x.repeat(1, n, 1, 1)
        h = h.contiguous(memory_format=torch.channels_last)  # grouped convolutions run faster so on the CPU
        batch_stats = []
        for layer, (weight, bias) in enumerate(zip(self.weight, self.bias)):
            if routed:  # gather each image's expert: (B, out, in, 3, 3) -> B groups
                weight, bias = weight[winner], bias[winner]
            h = F.conv2d(h, weight.flatten(0, 1), bias.flatten(), padding=1, groups=groups)
            if layer == last:
                break
            if self.batch_norm:
                shape = (1, -1, 1, 1)
                if routed:  # each image with its expert's statistics of the full pass
                    mean, var = (v[winner].view(shape) for v in stats[layer])
                    gamma, beta = self.norm_weight[layer][winner], self.norm_bias[layer][winner]
                else:
                    running_mean, running_var = getattr(self, f"running_mean{layer}"), getattr(self, f"running_var{layer}")
                    if self.training:  # statistics over the batch and the pixels, per channel of each expert
                        rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # a view: h is channels-last
                        mean = rows.mean(0)  # E[h]^2 subtracted from E[h^2]: several times faster than var_mean here
                        var = ((rows * rows).mean(0) - mean * mean).clamp(min=0)
                        with torch.no_grad():  # as nn.BatchNorm2d: momentum 0.1, the unbiased variance
                            running_mean.lerp_(mean.view(n, -1), 0.1)
                            running_var.lerp_(var.view(n, -1) * len(rows) / max(len(rows) - 1, 1), 0.1)
                    else:
                        mean, var = running_mean.flatten(), running_var.flatten()
                    batch_stats.append((mean.detach().view(n, -1), var.detach().view(n, -1)))
                    mean, var = mean.view(shape), var.view(shape)
                    gamma, beta = self.norm_weight[layer].flatten(), self.norm_bias[layer].flatten()
                scale = gamma.view(shape) * torch.rsqrt(var + 1e-5)  # (h - mean) / sqrt(var + eps) * gamma + beta,
                h = torch.addcmul(beta.view(shape) - mean * scale, h, scale)  # in one pass over h
            h = F.elu(h)
        if routed:
            return torch.sigmoid(h).reshape(B, c, H, W)
        return torch.sigmoid(h).reshape(B, n, c, H, W), batch_stats


class Discriminator(nn.Module):
    """An image -> the logit of 'drawn from P' (D(x) = sigmoid of it)."""

    def __init__(self, config):
        super().__init__()
        layers, channels, size = [], config.in_channels, config.image_size
        for i, width in enumerate(config.disc_channels):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ELU()]
            if i % 2 == 1 or i == len(config.disc_channels) - 1:  # pool every two layers
                layers.append(nn.AvgPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, config.disc_hidden), nn.ELU(),
                                  nn.Linear(config.disc_hidden, 1))

    def forward(self, images):
        """images (..., c, H, W) -> logits (...,)."""
        lead = images.shape[:-3]
        return self.head(self.features(images.reshape(-1, *images.shape[-3:]))).view(lead)


class LIM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.experts = Experts(config)
        self.discriminator = Discriminator(config)
        # training steps taken; the first identity_iters train the experts as the identity (Algorithm 1, line 1).
        # A buffer, so a checkpoint resumes in the right phase
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def frozen_discriminator(self, images):
        """D with its parameters detached: the gradient of its score reaches the images only."""
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return torch.func.functional_call(self.discriminator, params, (images,))

    def identity_loss(self, outputs, x):
        """Algorithm 1, line 1: every expert reconstructs its input x' (mean squared error)."""
        return F.mse_loss(outputs, x.unsqueeze(1).expand_as(outputs))

    def discriminator_loss(self, real, scores):
        """Algorithm 1, line 5, as a loss to minimise: -[log D(x) + 1/N' sum_j log(1 - c_j)], mean over the
        batch, every expert's output a fake. scores (B, N'): D's logits on the experts' outputs, computed
        from the outputs detached, so only D learns from this."""
        real_term = F.logsigmoid(self.discriminator(real)).mean()  # log D(x)
        fake_term = F.logsigmoid(-scores).mean()  # log(1 - c_j) = log sigmoid(-logit), mean over j and batch
        return -(real_term + fake_term)

    def expert_loss(self, won):
        """Algorithm 1, line 6, as a loss: -log c_j* of each image's winner, mean over the batch. won (B, c, H, W):
        each image through its winning expert only, so each expert learns only from the images it won; D is
        held fixed."""
        return -F.logsigmoid(self.frozen_discriminator(won)).mean()

    def forward(self, x, real=None, return_internals=False):
        """x (B, c, H, W): transformed images x'. In training mode with `real` (canonical images x, as many
        or not) the internals hold 'loss', the objective of this step (identity phase, then lines 5 + 6).
        Returns (the winning expert's output for each image (B, c, H, W), internals)."""
        B, arange = x.shape[0], torch.arange(x.shape[0], device=x.device)
        train = self.training and real is not None
        internals = {}
        if train and self.train_steps < self.config.identity_iters:  # line 1: every expert, with gradient
            outputs, _ = self.experts(x)
            loss = self.identity_loss(outputs, x)
            self.train_steps += 1
            winner = torch.zeros(B, dtype=torch.long, device=x.device)
            internals.update(loss=loss, identity_loss=loss.detach())
            best = outputs[:, 0]
        else:
            with torch.no_grad():  # every expert on every image, to score them (line 4)
                outputs, stats = self.experts(x)  # (B, N', c, H, W): E_j(x') for every j
            # 'alternate' runs line 5 at one step and line 6 at the next, so the experts meet the D just updated
            phase = ("joint" if self.config.updates == "joint" else
                     ("discriminator", "experts")[int(self.train_steps - self.config.identity_iters) % 2])
            with torch.set_grad_enabled(train and phase != "experts"):  # D learns from these scores (line 5)
                scores = self.discriminator(outputs)  # (B, N'): c_j
            winner = scores.detach().argmax(1)  # j* per image
            best = outputs[arange, winner]
            if train:
                losses = {}
                if phase != "experts":
                    losses["discriminator_loss"] = self.discriminator_loss(real, scores)  # line 5
                if phase != "discriminator":
                    best = self.experts(x, winner=winner, stats=stats)  # (B, c, H, W), with gradient
                    losses["expert_loss"] = self.expert_loss(best)  # line 6
                self.train_steps += 1
                internals.update(loss=sum(losses.values()), **{k: v.detach() for k, v in losses.items()})
            internals["scores"] = scores.detach()
        internals["winner"] = winner
        if return_internals:
            internals["expert_outputs"] = outputs.detach()
        return best, internals


if __name__ == "__main__":
    # a quick self-check: shapes, the identity phase, then one adversarial step
    cfg = LIMConfig(num_experts=3, expert_layers=3, expert_channels=8, disc_hidden=32, identity_iters=1)
    model = LIM(cfg)
    x, real = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28)
    for phase in ("identity", "adversarial"):
        out, internals = model(x, real=real)
        internals["loss"].backward()
        print(phase, tuple(out.shape), internals["loss"].item(), internals["winner"].tolist())
    print("parameters:", sum(p.numel() for p in model.parameters()))
