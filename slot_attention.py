"""
Slot Attention, in one file.

Paper: Francesco Locatello, Dirk Weissenborn, Thomas Unterthiner, Aravindh Mahendran, Georg Heigold,
Jakob Uszkoreit, Alexey Dosovitskiy, Thomas Kipf, "Object-Centric Learning with Slot Attention",
NeurIPS 2020, arXiv:2006.15055.

The idea:
- A CNN turns an image into a set of N feature vectors (one per position, with a position
  embedding). Slot Attention maps them to K "slots", vectors that each come to describe one object.
- Slots start as samples from one learned Gaussian, so they are exchangeable: any slot can bind any
  object, and the output is permutation-equivariant in the slots (section 2.1).
- Each of T iterations is dot-product attention with the softmax taken over the *slots*, not over
  the inputs: slots compete for every input position. Each slot then takes the attention-weighted
  mean of the values it won, and a GRU plus a residual MLP update it (Algorithm 1).
- Object discovery (section 2.2): a spatial broadcast decoder turns every slot into an RGB image and
  an alpha mask; the alphas are softmaxed over slots and the reconstruction is their mixture, trained
  with a pixel MSE. The alpha masks segment the image without any labels.
- Set prediction (section 2.2): an MLP reads each slot as one object's properties; the loss matches
  predictions to targets with the Hungarian algorithm (the task's loss, in data.py).

Paper symbol -> variable -> shape  (B batch, N = h * w input positions, K slots, D slot size)
    inputs        inputs            (B, N, D_in)   encoder features + position embedding, after the MLP
    mu, log sigma slots_mu, slots_log_sigma   (1, 1, D)   learned, both trained (Algorithm 1, line 1)
    slots         slots             (B, K, D)
    k(inputs)     keys              (B, N, D)
    v(inputs)     values            (B, N, D)
    q(slots)      queries           (B, K, D)
    attn          attention         (B, K, N)     softmax over K (Eq. 1): sums to one over slots
    W_{i,j}       weights           (B, K, N)     attn + eps renormalised over N (Eq. 2)
    updates       updates           (B, K, D)
    alpha_k       masks             (B, K, H, W)  decoder alphas softmaxed over K
    y             reconstruction    (B, C, H, W)  sum_k masks * rgb_k

Choices the paper leaves open, and what we do:
- Sizes follow Appendix E.1 for Multi-dSprites where we can afford them; at CPU scale (32 x 32
  sprites, see README) the encoder downsamples once (encoder_stride_layers) and the decoder starts
  at 8 x 8 and upsamples with stride-2 transposed convolutions, as the paper's CLEVR decoder does.
  decoder_init_size = image_size gives the Multi-dSprites decoder (broadcast at full size, stride 1).
- Slot init: mu and log sigma are nn.Parameters, both get gradient through the reparameterised
  sample slots = mu + exp(log sigma) * noise (several public ports miss this). Both start
  Xavier-uniform as in the official code (glorot uniform on a (1, 1, D) tensor), but PyTorch counts
  the fans of that shape differently: our bound is sqrt(3 / D), TF's sqrt(6 / (1 + D)).
- Inputs: the task feeds pixels in [-1, 1], as the official code does. official_init = True gives the
  official code's (Keras) initialisation, glorot uniform with zero biases and an orthogonal GRU
  recurrent matrix (keras_init_); the default keeps PyTorch's.
- Evaluation samples the initial slots as training does (as the official code does), so two
  evaluations of one checkpoint differ slightly.
- implicit_grad (Chang et al. 2022, "Object Representations as Fixed Points", arXiv:2207.00787):
  the first T - 1 iterations run, the slots are detached, and only the last iteration is
  differentiated (first-order implicit gradient). Our addition: the gradient that reaches the last
  iteration's input is passed straight to the initial slots (slots.detach() + init - init.detach()),
  so mu and log sigma still learn; a plain detach would leave them without any gradient.

Where the official code (google-research/slot_attention, TF) differs from plain reading of the
paper: none that we know of in the module; its q/k/v have no bias and the scale is D ** -0.5 with D
the slot size; we do the same.

Reproduce: python train.py --model slot_attention --task sprites          (object discovery, FG-ARI)
           python train.py --model slot_attention --task sprites_sets     (set prediction, AP)
(CPU-scale presets on generated sprites; the measured numbers, and the paper-scale commands, are in
the README: at CPU scale neither result is reproduced.)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SlotAttentionConfig:
    image_size: int = 32  # set from the task: square images of this side
    in_channels: int = 3  # set from the task: RGB
    output_size: int = 0  # set from the task: 0 = object discovery (decode the image); > 0 = set
    #                       prediction, this many properties per slot (section 2.2)
    num_slots: int = 6  # Appendix E.1: 6 slots for Multi-dSprites (CLEVR6: 7, Tetrominoes: 4)
    num_iterations: int = 3  # Appendix E.1: T = 3 iterations in training
    slot_size: int = 64  # D, Appendix E.1
    mlp_hidden_size: int = 128  # Appendix E.1: hidden layer of the slot update MLP
    encoder_channels: int = 32  # Appendix E.1, Table 4: 32 channels for Multi-dSprites (CLEVR: 64)
    encoder_layers: int = 4  # Table 4: four 5 x 5 convolutions
    encoder_stride_layers: int = 0  # how many of them (after the first) have stride 2; 0 = paper
    kernel_size: int = 5  # Table 4 and 5: 5 x 5
    decoder_channels: int = 32  # Table 5: 32 for Multi-dSprites
    decoder_layers: int = 3  # Table 5: three 5 x 5 layers before the 3 x 3 output layer
    decoder_init_size: int = 0  # spatial broadcast side; 0 = image_size (Multi-dSprites, Table 5);
    #                             smaller: stride-2 transposed convolutions upsample (CLEVR style)
    epsilon: float = 1e-8  # Algorithm 1: attn + eps before the weighted mean
    implicit_grad: bool = False  # Chang et al. 2022: differentiate only the last iteration
    official_init: bool = False  # the official (Keras) init: glorot uniform weights, zero biases, orthogonal
    #                              GRU recurrent weights (False: PyTorch's defaults)

    def __post_init__(self):
        for name in ("image_size", "in_channels", "num_slots", "num_iterations", "slot_size",
                     "mlp_hidden_size", "encoder_channels", "encoder_layers", "decoder_channels",
                     "decoder_layers", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.output_size < 0:
            raise ValueError(f"output_size must be >= 0 (0 = object discovery), got {self.output_size}")
        if not 0 <= self.encoder_stride_layers < self.encoder_layers:
            raise ValueError(f"encoder_stride_layers must be in [0, encoder_layers), got {self.encoder_stride_layers}")
        if self.image_size % (2 ** self.encoder_stride_layers):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2 ** encoder_stride_layers")
        init = self.decoder_init_size or self.image_size
        ups = round(math.log2(self.image_size / init)) if init <= self.image_size else -1
        if ups < 0 or init * 2 ** ups != self.image_size or ups > self.decoder_layers:
            raise ValueError(f"decoder_init_size must be image_size / 2**n with n <= decoder_layers "
                             f"(0 = image_size), got {self.decoder_init_size} for image_size {self.image_size}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")


class SlotAttentionModule(nn.Module):
    """Algorithm 1. forward(inputs (B, N, D_in)) -> slots after each iteration (B, T, K, D) (the
    last is the output) and the attention of each iteration (B, T, K, N)."""

    def __init__(self, num_slots, num_iterations, input_size, slot_size, mlp_hidden_size,
                 epsilon=1e-8, implicit_grad=False):
        super().__init__()
        self.num_slots, self.num_iterations, self.slot_size = num_slots, num_iterations, slot_size
        self.epsilon, self.implicit_grad = epsilon, implicit_grad
        self.norm_inputs = nn.LayerNorm(input_size)
        self.norm_slots = nn.LayerNorm(slot_size)
        self.norm_mlp = nn.LayerNorm(slot_size)
        # Algorithm 1 / official code: linear projections without bias
        self.project_q = nn.Linear(slot_size, slot_size, bias=False)
        self.project_k = nn.Linear(input_size, slot_size, bias=False)
        self.project_v = nn.Linear(input_size, slot_size, bias=False)
        self.gru = nn.GRUCell(slot_size, slot_size)
        self.mlp = nn.Sequential(nn.Linear(slot_size, mlp_hidden_size), nn.ReLU(),
                                 nn.Linear(mlp_hidden_size, slot_size))
        # Algorithm 1, line 1: slots ~ N(mu, diag(sigma)); mu and log sigma learned (section 2.1)
        self.slots_mu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_size)))
        self.slots_log_sigma = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, 1, slot_size)))

    def initial_slots(self, batch_size, num_slots, generator=None):
        """Algorithm 1, line 1: slots = mu + sigma * N(0, I), reparameterised so mu, log sigma learn."""
        noise = torch.randn(batch_size, num_slots, self.slot_size, generator=generator,
                            device=self.slots_mu.device, dtype=self.slots_mu.dtype)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def iterate(self, slots, keys, values):
        """One iteration of Algorithm 1 (lines 5-10). Returns new slots and the attention (B, K, N)."""
        slots_prev = slots
        slots = self.norm_slots(slots)  # line 5: LayerNorm(slots)
        queries = self.project_q(slots)  # (B, K, D)
        # line 6, Eq. 1: attn = softmax(k q^T / sqrt(D), axis = slots)
        logits = torch.einsum("bkd,bnd->bkn", queries, keys) * self.slot_size ** -0.5  # (B, K, N)
        attention = logits.softmax(dim=1)  # normalised over slots: slots compete for each input
        # line 7, Eq. 2: updates = WeightedMean(weights = attn + eps, values = v(inputs))
        weights = attention + self.epsilon
        weights = weights / weights.sum(dim=-1, keepdim=True)  # renormalised over the inputs
        updates = torch.einsum("bkn,bnd->bkd", weights, values)  # (B, K, D)
        # line 8 (section 2.1): slots = GRU(state = slots_prev, inputs = updates), batched over B * K
        B, K, D = updates.shape
        slots = self.gru(updates.reshape(B * K, D), slots_prev.reshape(B * K, D)).view(B, K, D)
        # line 9: slots += MLP(LayerNorm(slots))
        slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attention

    def forward(self, inputs, num_slots=None, num_iterations=None, slots=None):
        """inputs (B, N, D_in). num_slots / num_iterations override the config for this call
        (section 4: more slots or iterations at test time); slots (B, K, D) replaces the random init."""
        B = inputs.shape[0]
        K = num_slots or self.num_slots
        T = num_iterations or self.num_iterations
        init = self.initial_slots(B, K) if slots is None else slots
        inputs = self.norm_inputs(inputs)  # line 2: LayerNorm(inputs)
        keys, values = self.project_k(inputs), self.project_v(inputs)  # (B, N, D) each
        slots, history, attentions = init, [], []
        for t in range(T):  # line 3
            if self.implicit_grad and t == T - 1:
                # Chang et al. 2022: first-order implicit differentiation. Only the last iteration
                # is differentiated; the straight-through term hands its input gradient to the init.
                slots = slots.detach() + init - init.detach()
            slots, attention = self.iterate(slots, keys, values)
            history.append(slots)
            attentions.append(attention)
        return torch.stack(history, dim=1), torch.stack(attentions, dim=1)  # (B, T, K, D), (B, T, K, N)


class SoftPositionEmbed(nn.Module):
    """Appendix E.1 / official code: a linear map of the 4-channel grid [y, x, 1 - y, 1 - x] in
    [0, 1], added to the features."""

    def __init__(self, channels, size):
        super().__init__()
        ramp = torch.linspace(0.0, 1.0, size)
        y, x = torch.meshgrid(ramp, ramp, indexing="ij")
        self.register_buffer("grid", torch.stack([y, x, 1 - y, 1 - x], dim=-1), persistent=False)  # (h, w, 4)
        self.project = nn.Linear(4, channels)

    def forward(self, features):  # features (B, h, w, C) channels last
        return features + self.project(self.grid)


def keras_init_(model):
    """The official code's initialisation (Keras defaults; not in the paper): every dense and conv kernel
    glorot uniform, every bias zero, the GRU's input kernel glorot uniform and its recurrent kernel
    orthogonal. The fans of a conv kernel and of a GRU matrix count the same in torch and Keras; mu and
    log sigma keep their init (see the header)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.GRUCell):  # Keras GRU: kernel glorot, recurrent_kernel orthogonal, bias zeros
            nn.init.xavier_uniform_(m.weight_ih)
            nn.init.orthogonal_(m.weight_hh)
            nn.init.zeros_(m.bias_ih)
            nn.init.zeros_(m.bias_hh)


class SlotAttention(nn.Module):
    """Object discovery autoencoder (output_size = 0) or set prediction network (output_size > 0).

    forward(x (B, C, H, W), in [-1, 1] as the official code feeds it) -> (output, internals):
      discovery:      output = reconstruction (B, C, H, W); internals["masks"] (B, K, H, W) always;
                      with return_internals also "attention" (B, T, K, h, w) per iteration, "slot_rgb"
                      (B, K, C, H, W) and "masks_per_iteration" (B, T, K, H, W) (each iteration's
                      slots decoded, paper Fig. 2c).
      set prediction: output = properties (B, K, output_size) in [0, 1] (sigmoid, as the official
                      code); with return_internals "attention" (B, T, K, h, w).
    """

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        pad = c.kernel_size // 2
        layers, channels = [], c.in_channels
        for i in range(c.encoder_layers):  # Table 4: conv 5 x 5, ReLU, 'same' padding
            stride = 2 if 1 <= i <= c.encoder_stride_layers else 1
            layers += [nn.Conv2d(channels, c.encoder_channels, c.kernel_size, stride, pad), nn.ReLU()]
            channels = c.encoder_channels
        self.encoder = nn.Sequential(*layers)
        self.feature_size = c.image_size // 2 ** c.encoder_stride_layers  # h = w
        self.encoder_pos = SoftPositionEmbed(c.encoder_channels, self.feature_size)
        # section 2.2 / Appendix E.1: LayerNorm, then an MLP on every position before Slot Attention
        self.encoder_norm = nn.LayerNorm(c.encoder_channels)
        self.encoder_mlp = nn.Sequential(nn.Linear(c.encoder_channels, c.slot_size), nn.ReLU(),
                                         nn.Linear(c.slot_size, c.slot_size))
        self.slot_attention = SlotAttentionModule(c.num_slots, c.num_iterations, c.slot_size, c.slot_size,
                                                  c.mlp_hidden_size, c.epsilon, c.implicit_grad)
        if c.output_size:  # set prediction head (section 2.2, Appendix E.2): MLP on each slot
            self.property_mlp = nn.Sequential(nn.Linear(c.slot_size, c.slot_size), nn.ReLU(),
                                              nn.Linear(c.slot_size, c.output_size))
        else:  # spatial broadcast decoder (Watters et al. 2019), Table 5
            self.decoder_init_size = c.decoder_init_size or c.image_size
            self.decoder_pos = SoftPositionEmbed(c.slot_size, self.decoder_init_size)
            upsample = round(math.log2(c.image_size / self.decoder_init_size))
            layers, channels = [], c.slot_size
            for i in range(c.decoder_layers):
                if i < upsample:  # stride 2: doubles the side (CLEVR decoder of the official code)
                    layers.append(nn.ConvTranspose2d(channels, c.decoder_channels, c.kernel_size, 2, pad,
                                                     output_padding=1))
                else:
                    layers.append(nn.Conv2d(channels, c.decoder_channels, c.kernel_size, 1, pad))
                layers.append(nn.ReLU())
                channels = c.decoder_channels
            layers.append(nn.Conv2d(channels, c.in_channels + 1, 3, 1, 1))  # Table 5: 3 x 3, RGB + alpha
            self.decoder = nn.Sequential(*layers)
        if c.official_init:
            keras_init_(self)

    def encode(self, x):
        """(B, C, H, W) -> inputs (B, N, D) for Slot Attention."""
        features = self.encoder(x).permute(0, 2, 3, 1)  # (B, h, w, C)
        features = self.encoder_pos(features).flatten(1, 2)  # (B, N, C)
        return self.encoder_mlp(self.encoder_norm(features))

    def decode(self, slots):
        """slots (B, K, D) -> rgb (B, K, C, H, W), masks (B, K, H, W) softmaxed over slots."""
        B, K, D = slots.shape
        s = self.decoder_init_size
        grid = slots.reshape(B * K, 1, 1, D).expand(B * K, s, s, D)  # spatial broadcast
        grid = self.decoder_pos(grid).permute(0, 3, 1, 2)  # (B K, D, s, s)
        out = self.decoder(grid)  # (B K, C + 1, H, W)
        out = out.view(B, K, *out.shape[1:])
        rgb, alpha_logits = out[:, :, :-1], out[:, :, -1]
        masks = alpha_logits.softmax(dim=1)  # section 2.2: alphas normalised over slots
        return rgb, masks

    def forward(self, x, return_internals=False, num_slots=None, num_iterations=None):
        B = x.shape[0]
        inputs = self.encode(x)
        history, attention = self.slot_attention(inputs, num_slots, num_iterations)
        slots = history[:, -1]  # (B, K, D)
        h = self.feature_size
        internals = {}
        if return_internals:
            internals["attention"] = attention.view(*attention.shape[:3], h, h)  # (B, T, K, h, w)
        if self.config.output_size:
            return torch.sigmoid(self.property_mlp(slots)), internals  # (B, K, P)
        rgb, masks = self.decode(slots)
        reconstruction = (rgb * masks.unsqueeze(2)).sum(dim=1)  # section 2.2: y = sum_k alpha_k * rgb_k
        internals["masks"] = masks
        if return_internals:
            internals["slot_rgb"] = rgb
            # paper Fig. 2c: the slots after every iteration, each decoded to its masks
            earlier = [self.decode(history[:, t])[1] for t in range(history.shape[1] - 1)]
            internals["masks_per_iteration"] = torch.stack(earlier + [masks], dim=1)  # (B, T, K, H, W)
        return reconstruction, internals


if __name__ == "__main__":
    torch.manual_seed(0)
    model = SlotAttention(SlotAttentionConfig(image_size=32, num_slots=4, encoder_stride_layers=1, decoder_init_size=8))
    images = torch.rand(2, 3, 32, 32)
    recon, internals = model(images, return_internals=True)
    loss = F.mse_loss(recon, images)
    loss.backward()
    print("reconstruction", tuple(recon.shape), "masks", tuple(internals["masks"].shape),
          "attention", tuple(internals["attention"].shape), "loss", round(loss.item(), 4))
    print("masks sum to one over slots:", torch.allclose(internals["masks"].sum(1), torch.ones(2, 32, 32)))
