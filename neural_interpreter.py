"""
Neural Interpreter, in one file.

Paper: Nasim Rahaman, Muhammad Waleed Gondal, Shruti Joshi, Peter Gehler, Yoshua Bengio, Francesco
Locatello, Bernhard Schoelkopf, "Dynamic Inference with Neural Interpreters", NeurIPS 2021,
arXiv:2110.06399. Official code (the model only): github.com/nasimrahaman/neural-interpreter.

The idea:
- An image becomes a set of tokens ("variables"): one per patch, plus a learned CLS token per
  dataset. A program of scripts transforms them; the CLS token's final value is classified.
- A script holds a few functions and applies all of them for several iterations (with the same
  weights each time). Every function u has a frozen random signature s_u and a learned code c_u.
- Type inference: each token gets a type t_i = MLP(LN(x_i)). A token is routed to the functions whose
  signature is close to its type: d_ui = 1 - cos(s_u, t_i), K_ui = exp(-d_ui / sigma) where
  d_ui <= tau, else 0, and the compatibility C_ui = K_ui / (eps + sum_u K_ui) (section 2, type matching).
- Every linear map of a function is modulated by its code, ModLin(x; c) = W (x * LN(W_c c)) + b
  (section 2, ModLin): the functions share W, W_c and b, and differ by their codes only.
- A function is a few "lines of code" (LOCs), each a modulated attention and a modulated MLP whose
  updates are weighted by C: a token a function is not compatible with is not touched by it, and the
  attention between tokens i and j inside function u is weighted by C_ui C_uj (section 2, ModAttn, LOC).
- An iteration's output is the compatibility-weighted sum of the functions' outputs,
  y_i = sum_u C_ui x_ui (no residual around it, as the official digits preset).
- Transfer (section 4.2): on a new dataset, train only its new CLS token, or that and the codes of the
  functions, and keep every other weight fixed (train_only).

Paper symbol -> variable -> shape  (B batch, N tokens = 1 + patches, U functions, D width,
                                     T type size, H heads, L iterations)
    x_i            tokens                (B, N, D)
    s_u            signatures            (U, T)   frozen (a buffer), random
    c_u            codes                 (U, D_code)
    t_i            types                 (B, N, T)
    d_ui, K_ui     distance, kernel      (B, U, N)
    C_ui           compatibility         (B, U, N)   sums to 1 over u, or 0 where no function fits
    x_ui           per-function tokens   (B, U, N, D)
    sigma, tau     bandwidth (learned), truncation

Choices the paper leaves open, and what we do (following the official code and its digits preset):
- Truncation: distances beyond tau become +inf with a straight-through gradient, so exp gives an
  exact 0 (multiplying exp(-d) by a mask instead can give 0 * inf = NaN in the gradient); the distance
  is divided by sigma before, as the official kernel does, or sigma's gradient would be 0 * inf.
- Attention: softmax over keys of q k^T / sqrt(d_head) plus a relative position bias, multiplied by
  C_ui C_uj and renormalised over keys with eps (official LOCPod). The official relative positional
  encoder mixes heads and codes; ours is a learned bias per function, head and 2-D patch offset, with
  one more entry for any pair involving a CLS token. No absolute position embedding.
- LOC residuals (official residual_mode "modulated_attn"): a = x + C * ModAttn(LN(x)), then
  x' = a + C * ModMLP(LN(a)); the MLP is ModLin -> GELU -> ModLin; a ModLin follows the attention.
- Queries and keys have no bias; values and the rest do (official ModFC).
- One shared head (LayerNorm + Linear) reads the CLS token of every dataset (use_shared_prediction_head).
- Vectorised over functions: every function's tokens sit in one (B, U, N, D) tensor.

Reproduce: python train.py --model neural_interpreter --task digits --data_dir DIR    (MNIST stand-in)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NIConfig:
    image_size: int = 32  # set from the task: square images of this side (digits preset: 32)
    in_channels: int = 3  # set from the task
    output_size: int = 10  # set from the task: classes
    num_domains: int = 3  # set from the task: datasets, one CLS token each (digits: MNIST, MNIST-M, SVHN)
    patch_size: int = 4  # digits preset
    width: int = 192  # D, variable_features
    code_size: int = 192  # code_features
    type_size: int = 24  # type_features
    num_functions: int = 5
    num_iterations: int = 8  # function iterations per script, weights shared
    num_scripts: int = 1
    num_lines: int = 1  # LOCs per function (num_loc_pods)
    num_heads: int = 4
    head_size: int = 32  # query/key features per head (num_features_per_loc_head)
    truncation: float = 1.4202567871309753  # tau (digits preset)
    bandwidth: float = 1.0  # initial sigma (learned)
    epsilon: float = 1e-6
    train_only: str = "all"  # "all", or for transfer "cls" (the CLS tokens) or "cls_codes" (and the codes)

    def __post_init__(self):
        for name in ("image_size", "in_channels", "output_size", "num_domains", "patch_size", "width", "code_size",
                     "type_size", "num_functions", "num_iterations", "num_scripts", "num_lines", "num_heads", "head_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} must be divisible by num_heads {self.num_heads}")
        if not self.truncation > 0 or not self.bandwidth > 0:
            raise ValueError("truncation and bandwidth must be > 0")
        if self.train_only not in ("all", "cls", "cls_codes"):
            raise ValueError(f"train_only must be 'all', 'cls' or 'cls_codes', got {self.train_only!r}")


def compatibility(signatures, types, bandwidth, truncation, epsilon=1e-6):
    """Type matching (section 2). signatures (U, T), types (B, N, T) -> C (B, U, N): the truncated Gaussian kernel of the
    cosine distance, normalised over functions; 0 for every function where none is within tau."""
    distance = 1 - torch.einsum("ut,bnt->bun", F.normalize(signatures, dim=-1), F.normalize(types, dim=-1))
    scaled = distance / bandwidth  # divided first: exp(-inf / sigma) would give sigma a 0 * inf = NaN gradient
    truncated = torch.where(distance > truncation, torch.full_like(scaled, math.inf), scaled)
    scaled = scaled + (truncated - scaled).detach()  # the forward value truncated, the gradient of d / sigma
    kernel = torch.exp(-scaled)  # exactly 0 beyond tau, and its gradient 0 there (no NaN)
    return kernel / (kernel.sum(1, keepdim=True) + epsilon)


class ModLin(nn.Module):
    """ModLin (section 2): ModLin(x; c) = W (x * LN(W_c c)) + b, one shared W, W_c, b for every function.
    forward(x (B, U, N, in), codes (U, code)) -> (B, U, N, out)."""

    def __init__(self, in_features, out_features, code_size, bias=True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.scale = nn.Linear(code_size, in_features, bias=False)  # W_c

    def forward(self, x, codes):
        modulation = F.layer_norm(self.scale(codes), (x.shape[-1],))  # (U, in), LN without affine
        return self.linear(x * modulation[:, None, :])


class LineOfCode(nn.Module):
    """One line of code (LOC: ModAttn, then ModMLP; section 2), for every function at once: a modulated attention, then a modulated MLP, each
    update weighted by the token's compatibility with the function."""

    def __init__(self, c, grid):
        super().__init__()
        D, H, hs = c.width, c.num_heads, c.head_size
        self.num_heads, self.head_size, self.epsilon = H, hs, c.epsilon
        self.norm_attention, self.norm_mlp = nn.LayerNorm(D), nn.LayerNorm(D)
        self.query, self.key = ModLin(D, H * hs, c.code_size, bias=False), ModLin(D, H * hs, c.code_size, bias=False)
        self.value, self.out = ModLin(D, D, c.code_size), ModLin(D, D, c.code_size)
        self.mlp_in, self.mlp_out = ModLin(D, D, c.code_size), ModLin(D, D, c.code_size)
        # relative position bias per function and head: one entry per 2-D patch offset, and one for CLS pairs
        self.position_bias = nn.Parameter(torch.zeros(c.num_functions, H, (2 * grid - 1) ** 2 + 1))
        rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)
        offset = (rows[:, None] - rows[None] + grid - 1) * (2 * grid - 1) + (cols[:, None] - cols[None] + grid - 1)
        P = grid * grid
        index = torch.full((1 + P, 1 + P), (2 * grid - 1) ** 2)  # token 0 is the CLS token: its row and column
        index[1:, 1:] = offset
        self.register_buffer("bias_index", index, persistent=False)  # (N, N): which bias entry each pair uses

    def forward(self, x, codes, C):
        """x (B, U, N, D), codes (U, code), C (B, U, N) -> (B, U, N, D)."""
        B, U, N, D = x.shape
        H, hs = self.num_heads, self.head_size
        h = self.norm_attention(x)
        q = self.query(h, codes).view(B, U, N, H, hs)
        k = self.key(h, codes).view(B, U, N, H, hs)
        v = self.value(h, codes).view(B, U, N, H, D // H)
        logits = torch.einsum("buihd,bujhd->buhij", q, k) / math.sqrt(hs)
        logits = logits + self.position_bias[:, :, self.bias_index].unsqueeze(0)  # (1, U, H, N, N)
        weights = logits.softmax(-1)  # over the keys j
        weights = weights * (C[:, :, None, :, None] * C[:, :, None, None, :])  # ModAttn: times C_ui C_uj
        weights = weights / (weights.sum(-1, keepdim=True) + self.epsilon)
        attended = torch.einsum("buhij,bujhd->buihd", weights, v).reshape(B, U, N, D)
        gate = C.unsqueeze(-1)
        a = x + gate * self.out(attended, codes)  # LOC: the attention's update gated by C_ui
        m = self.mlp_out(F.gelu(self.mlp_in(self.norm_mlp(a), codes)), codes)
        return a + gate * m  # and the MLP's


class Script(nn.Module):
    """Type inference, the functions (signatures, codes) and their LOCs, applied num_iterations times."""

    def __init__(self, c, grid):
        super().__init__()
        self.config = c
        self.type_inference = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.width), nn.GELU(),
                                            nn.Linear(c.width, c.type_size))
        self.register_buffer("signatures", torch.randn(c.num_functions, c.type_size))  # frozen (detached)
        self.codes = nn.Parameter(torch.randn(c.num_functions, c.code_size))
        self.bandwidth = nn.Parameter(torch.tensor(float(c.bandwidth)))
        self.lines = nn.ModuleList([LineOfCode(c, grid) for _ in range(c.num_lines)])

    def forward(self, x):
        """x (B, N, D) -> x (B, N, D) and the compatibility of every iteration (B, L, U, N)."""
        c = self.config
        maps = []
        for _ in range(c.num_iterations):
            C = compatibility(self.signatures, self.type_inference(x), self.bandwidth, c.truncation, c.epsilon)
            xu = x.unsqueeze(1).expand(-1, c.num_functions, -1, -1)  # every function starts from the same tokens
            for line in self.lines:
                xu = line(xu, self.codes, C)
            x = torch.einsum("bun,bund->bnd", C, xu)  # the function iteration's output: y_i = sum_u C_ui x_ui
            maps.append(C)
        return x, torch.stack(maps, 1)


class NeuralInterpreter(nn.Module):
    """forward(x (B, C, H, W), domain (B,) int64 = which dataset, default 0) -> logits (B, classes) and
    internals {"compatibility": (B, scripts * iterations, U, N)}."""

    def __init__(self, config: NIConfig):
        super().__init__()
        self.config = c = config
        grid = c.image_size // c.patch_size
        self.patch_embedding = nn.Linear(c.in_channels * c.patch_size ** 2, c.width)
        self.cls_tokens = nn.Parameter(torch.randn(c.num_domains, c.width) * 0.02)
        self.scripts = nn.ModuleList([Script(c, grid) for _ in range(c.num_scripts)])
        self.head = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, c.output_size))
        if c.train_only != "all":  # transfer: every other parameter stays as it is
            keep = {"cls_tokens"} | ({f"scripts.{i}.codes" for i in range(c.num_scripts)} if c.train_only == "cls_codes" else set())
            for name, parameter in self.named_parameters():
                parameter.requires_grad_(name in keep)

    def tokens(self, x, domain):
        p = self.config.patch_size
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, patches, C p p), row by row
        return torch.cat([self.cls_tokens[domain].unsqueeze(1), self.patch_embedding(patches)], 1)

    def forward(self, x, return_internals=False, domain=None):
        if domain is None:
            domain = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        tokens = self.tokens(x, domain)
        maps = []
        for script in self.scripts:
            tokens, C = script(tokens)
            maps.append(C)
        return self.head(tokens[:, 0]), {"compatibility": torch.cat(maps, 1)}


if __name__ == "__main__":  # smoke test: python neural_interpreter.py
    torch.manual_seed(0)
    model = NeuralInterpreter(NIConfig(image_size=28, in_channels=1, patch_size=7, width=32, code_size=32, type_size=8,
                                       num_iterations=2, num_heads=2, head_size=8, num_domains=2))
    logits, internals = model(torch.rand(3, 1, 28, 28), domain=torch.tensor([0, 1, 1]))
    logits.sum().backward()
    C = internals["compatibility"]
    print("logits", tuple(logits.shape), "compatibility", tuple(C.shape), "sums over functions",
          [round(v, 3) for v in C.sum(2).flatten()[:5].tolist()], "parameters", sum(p.numel() for p in model.parameters()))
