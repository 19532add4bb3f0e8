"""
Neural Turing Machine, in one file.

Paper: Alex Graves, Greg Wayne, Ivo Danihelka, "Neural Turing Machines", 2014, arXiv:1410.5401.

The idea:
- A controller network (an LSTM here, or a feed-forward net) talks to the world through
  its inputs and outputs, and to an external memory matrix M (N rows of width W) through
  read and write heads.
- Every head emits a *weighting* w over the N rows; reading and writing are weighted sums,
  so the whole machine is differentiable and trains end to end with gradient descent.
- A head addresses memory by content (cosine similarity to a key, Eq. 5-6), then may
  fall back to its previous weighting (Eq. 7), shift it circularly (Eq. 8) and sharpen
  it (Eq. 9). Content lookup plus shifting is what lets an NTM learn "write here, move
  one row, write again" and so copy sequences far longer than any it was trained on.

Paper symbol -> variable -> shape  (B batch, H heads, N memory rows, W row width)
    M_t        memory          (B, N, W)
    w_t        weights         (B, H, N)
    k_t        key             (B, H, W)
    beta_t     key_strength    (B, H, 1)
    g_t        gate            (B, H, 1)
    s_t        shift           (B, H, 2S+1)
    gamma_t    sharpen         (B, H, 1)
    e_t, a_t   erase, add      (B, Hw, W)
    r_t        reads           (B, Hr, W)

Choices the paper leaves open, and what we do:
- Memory starts as a small constant (1e-6) in every cell: Collier & Beel 2018,
  "Implementing Neural Turing Machines" (arXiv:1807.08518), found this trains about twice
  as fast and more reliably than learned or random initial memory.
- Each head's initial weighting is one-hot on row 0, so location-based addressing has a
  definite place to start from (with constant memory, content addressing is uniform).
  The initial read vectors are learned.
- At each step all heads address the memory left by the previous step; reads see that
  memory, then the writes are applied (erase from all write heads, then add, Eq. 3-4).
- Sharpening (Eq. 9) is computed as softmax(gamma * log w), the same function written so
  that zeros in w give no NaN gradient. Addressing runs in fp32 even under autocast.
- Erase vectors go through a sigmoid (the paper asks for (0, 1)); add vectors through a
  tanh (the paper leaves them unconstrained; bounding them keeps the memory bounded).

Reproduce the copy result (paper Fig. 4): python train.py --model ntm --task copy
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class NTMConfig:
    input_size: int = 9  # set from the task: 8 bits + 1 delimiter channel for copy
    output_size: int = 8  # set from the task
    controller: str = "lstm"  # 'lstm' (paper's best, section 4) or 'feedforward'
    controller_size: int = 100  # section 4, Table 1: one LSTM layer of 100 units
    num_read_heads: int = 1  # section 4, Table 1
    num_write_heads: int = 1  # section 4, Table 1
    memory_size: int = 128  # N, section 4.1: 128 x 20 memory
    memory_width: int = 20  # W (the paper's M)
    shift_range: int = 1  # shifts -1, 0, +1 (section 3.3.2)
    memory_init: float = 1e-6  # constant initial memory (Collier & Beel 2018)

    def __post_init__(self):
        if self.controller not in ("lstm", "feedforward"):
            raise ValueError(f"controller must be 'lstm' or 'feedforward', got {self.controller!r}")
        for name in ("input_size", "output_size", "controller_size", "num_read_heads",
                     "num_write_heads", "memory_size", "memory_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.shift_range < self.memory_size / 2:
            raise ValueError(f"shift_range must be in [0, memory_size/2), got {self.shift_range}")


# ----------------------------------------------------------------------------------------------
# Addressing (section 3.3). Pure functions of tensors, so tests can check them by hand.

def content_weights(memory, key, key_strength, eps=1e-8):
    """Eq. 5-6. memory (B, N, W), key (B, H, W), key_strength (B, H, 1) -> (B, H, N)."""
    # Eq. 6: K[u, v] = u.v / (||u|| ||v||), for every head and row at once
    dot = torch.einsum("bhw,bnw->bhn", key, memory)
    norms = key.norm(dim=-1, keepdim=True) * memory.norm(dim=-1).unsqueeze(1)
    similarity = dot / (norms + eps)
    # Eq. 5: w_c(i) = exp(beta K[k, M(i)]) / sum_j exp(beta K[k, M(j)])
    return torch.softmax(key_strength * similarity, dim=-1)


def interpolate(content_w, prev_w, gate):
    """Eq. 7: w_g = g w_c + (1 - g) w_{t-1}."""
    return gate * content_w + (1 - gate) * prev_w


def circular_shift(weights, shift):
    """Eq. 8: w~(i) = sum_j w_g(j) s(i - j), indices modulo N.
    weights (B, H, N), shift (B, H, 2S+1) with shift[..., S + o] the weight of moving by o."""
    S = (shift.shape[-1] - 1) // 2
    # rolling w by +o moves mass from row j to row j + o: that is the s(o) term of the sum
    rolled = torch.stack([torch.roll(weights, o, dims=-1) for o in range(-S, S + 1)], dim=-1)
    return (rolled * shift.unsqueeze(-2)).sum(-1)


def sharpen(weights, gamma, eps=1e-12):
    """Eq. 9: w(i) = w~(i)^gamma / sum_j w~(j)^gamma, computed as softmax(gamma log w~)."""
    return torch.softmax(gamma * torch.log(weights + eps), dim=-1)


def write_memory(memory, write_w, erase, add):
    """Eq. 3-4 for all write heads. memory (B, N, W), write_w (B, Hw, N), erase/add (B, Hw, W)."""
    # Eq. 3: M~(i) = M(i) [1 - w(i) e]; with several heads the erasures multiply (order-free)
    keep = (1 - write_w.unsqueeze(-1) * erase.unsqueeze(-2)).prod(dim=1)  # (B, N, W)
    # Eq. 4: M(i) = M~(i) + w(i) a; the additions sum over heads
    return memory * keep + torch.einsum("bhn,bhw->bnw", write_w, add)


def read_memory(memory, read_w):
    """Eq. 2: r = sum_i w(i) M(i). memory (B, N, W), read_w (B, Hr, N) -> (B, Hr, W)."""
    return torch.einsum("bhn,bnw->bhw", read_w, memory)


# ----------------------------------------------------------------------------------------------

class NTM(nn.Module):
    """forward(x) with x (B, T, input_size) -> logits (B, T, output_size), internals dict."""

    def __init__(self, config: NTMConfig):
        super().__init__()
        self.config = c = config
        H = c.num_read_heads + c.num_write_heads
        self.num_shifts = 2 * c.shift_range + 1
        controller_in = c.input_size + c.num_read_heads * c.memory_width
        if c.controller == "lstm":
            self.controller = nn.LSTMCell(controller_in, c.controller_size)
        else:
            self.controller = nn.Linear(controller_in, c.controller_size)
        # every head emits key (W), key strength, gate, shift (2S+1), gamma; write heads also
        # erase (W) and add (W). One linear layer produces the parameters of all heads.
        self.addr_params = c.memory_width + 3 + self.num_shifts
        self.head_params = nn.Linear(c.controller_size, H * self.addr_params
                                     + c.num_write_heads * 2 * c.memory_width)
        # outputs depend on the controller and on what was just read (section 2)
        self.output = nn.Linear(c.controller_size + c.num_read_heads * c.memory_width, c.output_size)
        self.init_reads = nn.Parameter(torch.randn(c.num_read_heads, c.memory_width) * 0.01)

    def initial_state(self, batch_size, device):
        c = self.config
        H = c.num_read_heads + c.num_write_heads
        memory = torch.full((batch_size, c.memory_size, c.memory_width), c.memory_init, device=device)
        weights = torch.zeros(batch_size, H, c.memory_size, device=device)
        weights[:, :, 0] = 1.0
        reads = self.init_reads.float().expand(batch_size, -1, -1)
        zeros = torch.zeros(batch_size, c.controller_size, device=device)
        controller_state = (zeros, zeros) if c.controller == "lstm" else None
        return memory, weights, reads, controller_state

    def step(self, x, state):
        """One time step. x (B, input_size) -> logits (B, output_size), new state, internals."""
        c = self.config
        memory, prev_w, reads, controller_state = state
        B, Hr, Hw, W = x.shape[0], c.num_read_heads, c.num_write_heads, c.memory_width
        controller_in = torch.cat([x, reads.reshape(B, Hr * W).to(x.dtype)], dim=-1)
        if c.controller == "lstm":
            h, cell = self.controller(controller_in, controller_state)
            controller_state = (h, cell)
        else:
            h = torch.relu(self.controller(controller_in))
        params = self.head_params(h).float()  # addressing in fp32, also under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            addr = params[:, : (Hr + Hw) * self.addr_params].view(B, Hr + Hw, self.addr_params)
            key, beta, gate, shift, gamma = addr.split([W, 1, 1, self.num_shifts, 1], dim=-1)
            # section 3.3: beta >= 0, g in (0, 1), s a distribution over shifts, gamma >= 1
            beta, gate = F.softplus(beta), torch.sigmoid(gate)
            shift, gamma = torch.softmax(shift, dim=-1), 1 + F.softplus(gamma)
            w = content_weights(memory, key, beta)  # Eq. 5-6
            w = interpolate(w, prev_w, gate)  # Eq. 7
            w = circular_shift(w, shift)  # Eq. 8
            w = sharpen(w, gamma)  # Eq. 9
            read_w, write_w = w[:, :Hr], w[:, Hr:]
            reads = read_memory(memory, read_w)  # Eq. 2
            erase_add = params[:, (Hr + Hw) * self.addr_params:].view(B, Hw, 2 * W)
            erase, add = torch.sigmoid(erase_add[..., :W]), torch.tanh(erase_add[..., W:])
            memory = write_memory(memory, write_w, erase, add)  # Eq. 3-4
        logits = self.output(torch.cat([h, reads.reshape(B, Hr * W).to(h.dtype)], dim=-1))
        internals = {"read_weights": read_w, "write_weights": write_w, "reads": reads, "adds": add}
        return logits, (memory, w, reads, controller_state), internals

    def forward(self, x, return_internals=False):
        state = self.initial_state(x.shape[0], x.device)
        outputs, trace = [], []
        for t in range(x.shape[1]):
            logits, state, internals = self.step(x[:, t], state)
            outputs.append(logits)
            if return_internals:
                trace.append(internals)
        logits = torch.stack(outputs, dim=1)  # (B, T, output_size)
        if not return_internals:
            return logits, {}
        # each internal stacked over time: read_weights (B, T, Hr, N), adds (B, T, Hw, W), ...
        return logits, {k: torch.stack([step[k] for step in trace], dim=1) for k in trace[0]}


if __name__ == "__main__":  # smoke test: python ntm.py
    model = NTM(NTMConfig())
    logits, internals = model(torch.randn(2, 5, 9), return_internals=True)
    print(logits.shape, {k: tuple(v.shape) for k, v in internals.items()})
