"""
Adaptive Computation Time, in one file.

Paper: Alex Graves, "Adaptive Computation Time for Recurrent Neural Networks", 2016, arXiv:1603.08983.

The idea:
- A recurrent network may take a variable number N(t) of state updates ("ponder steps") for each
  input x_t instead of exactly one. Every update sees the same input, plus a flag that is 1 only on
  the first update of the input step (Eq. 3), so the network can tell a new input from more thought.
- After each update a sigmoidal halting unit emits h_t^n (Eq. 5). The network stops once the h's
  add up to 1 - eps (Eq. 7); the last step gets what is left of 1, the remainder R(t) (Eq. 6, 8).
  These p_t^n form a probability distribution over the steps taken.
- The state passed on and the output emitted are p-weighted means of the intermediate states and
  outputs (Eq. 9): deterministic and differentiable, no sampling, no noisy gradient estimates.
- Pondering is paid for: the ponder cost rho_t = N(t) + R(t) (Eq. 10), summed over the sequence
  (Eq. 11), is added to the loss with a time penalty tau (Eq. 12). N(t) is piecewise constant, so
  the gradient flows through R(t) alone: -1 for every h before the halting step, 0 for it (Eq. 14).

Paper symbol -> variable -> shape  (B batch, T input steps, H hidden units, K ponder steps run)
    x_t^n      cell_input      (B, input_size + 1)    x_t with the first-step flag delta_{n,1}
    s_t^n      state           tuple of (B, H): (h,) for rnn and gru, (h, c) for lstm
    s_t        mean_state      the same, Eq. 9
    y_t        logits          (B, T, output_size)
    h_t^n      halting_value   (B,)
    p_t^n      halting_prob    (B,); all of them: halting_probs (B, T, K)
    N(t)       steps           (B, T) int64
    R(t)       1 - halting_sum (B,)
    rho_t      ponder_cost     (B, T)
    tau, eps, M  time_penalty, eps, max_steps

Choices the paper leaves open, and what we do:
- The halting unit and the outputs read the hidden vector h. For an LSTM the paper's state "also
  contains the activations of the memory cells" (section 2): the mean-field update of Eq. 9 sums
  both h and c, and the columns of W_h and W_y that would read c are fixed to 0 (the paper allows it).
- Eq. 4 is affine and the p_t^n sum to one, so Eq. 9's y_t = sum_n p_t^n y_t^n is exactly
  W_y s_t + b_y: we apply the output layer once per input step, to the mean state.
- Halting arithmetic (h, the sums, p, rho, the mean state) is fp32, also under autocast.
- Every sample of the batch halts on its own; the loop over ponder steps runs until all have halted
  or n = M (Eq. 13). A halted sample's state stops changing and its p is 0 for the steps that follow.
- act=False is the paper's baseline, the plain RNN of Eq. 1-2: one update per input, no flag, no
  halting unit. It reports what an ACT net that halts at once would: steps N = 1, p = R = 1, so
  ponder_cost rho = 2, a constant without gradient (its ponder_loss moves no parameter).
- time_penalty = 1e-3: the paper grids tau over i x 10^-j (i 1-10, j 1-4, section 3); on parity
  every tau <= 0.03 gave a mean error under 5% (Fig. 4) and lower tau learned faster (Fig. 5), but
  some of the lowest-tau nets pondered far longer (section 3.1). 1e-3 sits inside the good range.
- The training loss is task loss + model.ponder_loss(internals), i.e. + tau * P(x) with P summed
  over each sequence's input steps and averaged over the batch (Eq. 11-12).

Reproduce the parity result (paper Fig. 4): python train.py --model act --task parity
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

CELLS = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}  # nn.RNNCell is tanh by default


@dataclass
class ACTConfig:
    input_size: int = 64  # set from the task: 64-element vectors for parity (section 3.1)
    output_size: int = 1  # set from the task: one sigmoidal output unit for parity (section 3.1)
    hidden_size: int = 128  # section 3.1: a single hidden layer of 128 tanh units
    cell: str = "rnn"  # 'rnn' (tanh, the parity net), 'lstm' (every other experiment) or 'gru'
    act: bool = True  # False: the plain RNN baseline, one step per input (Eq. 1-2)
    eps: float = 0.01  # section 2 and 3: halt once the h's sum to 1 - eps
    max_steps: int = 100  # M, Eq. 13; 100 in all experiments (section 3)
    halting_bias_init: float = 1.0  # b_h, section 3: initialised to 1, so nets start pondering little
    time_penalty: float = 1e-3  # tau, Eq. 12 (see the module docstring for the choice)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("input_size", "output_size", "hidden_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if self.time_penalty < 0:
            raise ValueError(f"time_penalty must be at least 0, got {self.time_penalty}")


# ----------------------------------------------------------------------------------------------
# The halting rule (section 2). A pure function of tensors, so tests can check it by hand.

def halting_distribution(halting_values, eps):
    """Eq. 6-8 and 13 for one input step. halting_values (B, M) are h_t^1 .. h_t^M; a sample whose
    h's never sum to 1 - eps halts at the last column, step M (Eq. 13).
    Returns halting_probs p (B, M), zero after N; steps N (B,) int64, counted from 1; remainder R (B,)."""
    M = halting_values.shape[-1]
    step = torch.arange(1, M + 1, device=halting_values.device)  # n
    summed = halting_values.cumsum(-1)  # sum_{n'=1}^{n} h_t^{n'}, up to and including step n
    halts = (summed >= 1 - eps) | (step == M)  # Eq. 7, capped at M by Eq. 13
    steps = halts.int().argmax(-1) + 1  # N(t): the first step that halts (argmax gives the first)
    before = step < steps.unsqueeze(-1)  # n < N(t)
    remainder = 1 - (halting_values * before).sum(-1)  # Eq. 8
    at_halt = step == steps.unsqueeze(-1)  # n = N(t)
    halting_probs = torch.where(before, halting_values, 0.0) + at_halt * remainder.unsqueeze(-1)  # Eq. 6
    return halting_probs, steps, remainder


# ----------------------------------------------------------------------------------------------

class ACT(nn.Module):
    """forward(x) with x (B, T, input_size) -> logits (B, T, output_size), internals dict."""

    def __init__(self, config: ACTConfig):
        super().__init__()
        self.config = c = config
        # Eq. 3: x_t^n = x_t + delta_{n,1}, the first-step flag appended as one more input
        flag_size = 1 if c.act else 0
        self.cell = CELLS[c.cell](c.input_size + flag_size, c.hidden_size)
        self.output = nn.Linear(c.hidden_size, c.output_size)  # W_y, b_y (Eq. 2, 4)
        if c.act:
            self.halting_unit = nn.Linear(c.hidden_size, 1)  # W_h, b_h (Eq. 5)
            nn.init.constant_(self.halting_unit.bias, c.halting_bias_init)

    def initial_state(self, batch_size, device):
        zeros = torch.zeros(batch_size, self.config.hidden_size, device=device)
        return (zeros, zeros) if self.config.cell == "lstm" else (zeros,)

    def run_cell(self, cell_input, state):
        """S of Eq. 1 and 3 on a state tuple: (h,) for rnn and gru, (h, c) for lstm."""
        if self.config.cell == "lstm":
            return self.cell(cell_input, state)
        return (self.cell(cell_input, state[0]),)

    def step(self, cell_input, state, mean_state, halting_sum, running, last_step=False):
        """Ponder step n of one input step, for the whole batch (Eq. 3, 5-9, one step at a time).
        cell_input (B, input_size + 1) is x_t^n. state is s_t^{n-1} (s_{t-1} when n = 1), mean_state
        the sum of p s over the steps so far, halting_sum (B,) the sum of h over the steps taken before
        the halting one, running (B,) bool the samples that have not halted. last_step: n = M.
        Returns those four updated and halting_prob p_t^n (B,), zero for samples that had halted."""
        new_state = self.run_cell(cell_input, state)  # Eq. 3
        with torch.autocast(device_type=cell_input.device.type, enabled=False):
            halting_value = torch.sigmoid(self.halting_unit(new_state[0].float())).squeeze(-1)  # Eq. 5
            # Eq. 7, 13: step n is N(t) once the h's up to and including h_t^n reach 1 - eps, or n = M
            halts_now = running & ((halting_sum + halting_value >= 1 - self.config.eps) | last_step)
            continues = running & ~halts_now
            # Eq. 6, 8: steps before N(t) weigh h_t^n; step N(t) takes R(t) = 1 - sum_{n < N(t)} h_t^n
            halting_prob = torch.where(continues, halting_value, torch.where(halts_now, 1 - halting_sum, 0.0))
            halting_sum = halting_sum + torch.where(continues, halting_value, 0.0)
            # Eq. 9, one term at a time: s_t = sum_n p_t^n s_t^n, for an LSTM over h and c both
            weight = halting_prob.unsqueeze(-1)
            mean_state = tuple(m + weight * s.float() for m, s in zip(mean_state, new_state))
        # a halted sample's state stays as it was; with p = 0 it adds nothing to the mean
        state = tuple(torch.where(running.unsqueeze(-1), new, old) for new, old in zip(new_state, state))
        return state, mean_state, halting_sum, continues, halting_prob

    def ponder(self, x, state):
        """One input step with ACT. x (B, input_size), state s_{t-1}.
        Returns s_t, ponder_cost rho_t (B,), steps N(t) (B,) int64, halting_probs (B, K).
        The loop over ponder steps and its early exit stay in Python; step is what train.py compiles."""
        B, M = x.shape[0], self.config.max_steps
        flag = torch.ones(B, 1, dtype=x.dtype, device=x.device)
        first_input, later_input = torch.cat([x, flag], -1), torch.cat([x, 0 * flag], -1)  # Eq. 3
        mean_state = tuple(torch.zeros_like(s, dtype=torch.float32) for s in state)
        halting_sum = torch.zeros(B, device=x.device)
        running = torch.ones(B, dtype=torch.bool, device=x.device)
        steps = torch.zeros(B, dtype=torch.long, device=x.device)
        halting_probs = []
        for n in range(1, M + 1):
            steps = steps + running  # N(t): the steps each sample takes
            state, mean_state, halting_sum, running, halting_prob = self.step(
                first_input if n == 1 else later_input, state, mean_state, halting_sum, running, n == M)
            halting_probs.append(halting_prob)
            if not running.any():
                break
        # Eq. 10: rho_t = N(t) + R(t), where halting_sum stopped before the halting step;
        # N(t) is a constant, the gradient flows through R(t) alone (Eq. 14)
        ponder_cost = steps + (1 - halting_sum)
        return mean_state, ponder_cost, steps, torch.stack(halting_probs, dim=-1)

    def forward(self, x, return_internals=False):
        B, T, _ = x.shape
        state = self.initial_state(B, x.device)
        outputs, ponder_costs, all_steps, all_probs = [], [], [], []
        for t in range(T):
            if self.config.act:
                state, ponder_cost, steps, halting_probs = self.ponder(x[:, t], state)
            else:  # Eq. 1: one update per input, reported as an ACT step halting at once, p = R = 1
                state = self.run_cell(x[:, t], state)
                steps = torch.ones(B, dtype=torch.long, device=x.device)
                ponder_cost, halting_probs = steps + 1.0, torch.ones(B, 1, device=x.device)
            # Eq. 9 with Eq. 4: y_t = sum_n p_t^n (W_y s_t^n + b_y) = W_y s_t + b_y, as the p sum to 1
            outputs.append(self.output(state[0]))
            ponder_costs.append(ponder_cost)
            all_steps.append(steps)
            all_probs.append(halting_probs)
        logits = torch.stack(outputs, dim=1)  # (B, T, output_size)
        internals = {"ponder_cost": torch.stack(ponder_costs, dim=1),  # (B, T), rho_t
                     "steps": torch.stack(all_steps, dim=1)}  # (B, T), N(t)
        if return_internals:  # p_t^n, zero after N(t): (B, T, the most steps any input step took)
            K = max(p.shape[-1] for p in all_probs)
            padded = [F.pad(p, (0, K - p.shape[-1])) for p in all_probs]
            internals["halting_probs"] = torch.stack(padded, dim=1)
        return logits, internals

    def ponder_loss(self, internals):
        """tau P(x) of Eq. 11-12, P summed over each sequence, averaged over the batch. Training loss:
        task loss + model.ponder_loss(internals)."""
        return self.config.time_penalty * internals["ponder_cost"].sum(1).mean()


if __name__ == "__main__":  # smoke test: python act.py
    model = ACT(ACTConfig())
    logits, internals = model(torch.randn(2, 5, 64), return_internals=True)
    print(logits.shape, {k: tuple(v.shape) for k, v in internals.items()})
