"""Layer-wise Feedback Propagation (Weber et al., TMLR 2025): rewards distributed like LRP.

Instead of a gradient, a reward is sent from the output down through the net and every
parameter receives its share as feedback F; the trainer sees grad = -F, so any optimiser
works unchanged. Equations (claims.md E), for a layer z_j = sum_i w_ij a_i + b_j:

- reward at the output (pluggable): r = z o (onehot(y) - softmax(z)); with the trainer's
  mean cross-entropy the incoming gradient is g = (softmax - onehot) / B, so r = -z o g
  (option reward_scale "mean", the default), or B times that, one reward per sample as the
  authors' SoftmaxLossReward gives (reward_scale "sum"): their feedback is summed over the
  batch. With reward_scale "sum" and clip_update_norm 3.0, one training step equals the
  authors' Trainer.lfp_step (tests/test_lfprop_parity.py, against lfprop 1.0.0).
- LFP-eps / LFP-0: s_j = r_j / (z_j + eps sign(z_j)) (sign(0) = +1); r_i = a_i sum_j w_ij s_j;
  F_ij = |w_ij| a_i s_j, F_bj = |b_j| s_j.
- LFP-alpha-beta (alpha - beta = 1) and LFP-z+z-: the message from neuron j to input i is
  split by the sign of the contribution z_ij = w_ij a_i, with z+_j / z-_j the sums of the
  positive / negative contributions (the bias counted with its sign):
  alpha-beta: R_ij = (alpha z+_ij / z+_j - beta z-_ij / z-_j) r_j;
  z+z-:       R_ij = (z+_ij / z+_j + z-_ij / z-_j) r_j / 2  (every fraction in [0, 1], so the
  sent reward never exceeds the received one: no exploding feedback in deep nets).
  Parameter feedback is the signed share of the message, F_ij = sign(w_ij) sum_n R_ij,
  which for the eps rule is exactly |w_ij| a_i s_j above. The seed paper gives no formula
  for these two variants; these are the standard LRP alpha-beta and a normalised z+/z-
  split, and the tests check them against float64 references written from the lines above.
  KNOWN PROBLEM: with the reward r = z o (onehot - softmax), the split fractions do not
  cancel the sign of z as s = r / z does in the eps rule, so a unit with z < 0 is pushed the
  wrong way and MNIST training diverges (tests/test_rules_semantics.py, strict xfail). Use
  lfp_eps / lfp0 for experiments until the authors' formulation is checked.

Activations (ReLU, sigmoid, a Heaviside step, spiking LIF units: any module of an
activation class or with `bpfree_activation = True`) pass the reward through unchanged,
which is what lets LFP train nets whose derivative is zero almost everywhere. Max pooling
routes the reward to the maximum (as autograd does); average pooling and explicit residual
`Add` modules distribute it in proportion to the inputs' contributions (eps rule).
BatchNorm is treated as the per-channel linear map it is in the forward pass,
y = (gamma / sigma) x + (beta - gamma mu / sigma), with the batch statistics in training:
the eps rule sends r_x = x (gamma / sigma) s and gives gamma the feedback |gamma| sum(x_hat s)
and beta |beta| sum(s).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from bpfree.rules.base import CONV_LAYERS, Rule, conv2d_call, register_rule

ACTIVATION_CLASSES = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.SiLU,
                      nn.Softplus, nn.Hardtanh, nn.ReLU6)
AVG_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
VARIANTS = ("eps", "alpha_beta", "zplus_zminus")
STABILISER = 1e-6  # added (with the sign) to z+ / z- of the split rules


def _divide(r: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """s = r / (z + eps sign(z)) with sign(0) := +1; for eps = 0 (LFP-0) a unit with z = 0
    passes nothing (s = 0) instead of 0/0. Written as in-place passes over one buffer: the
    same values bit for bit as the torch.where form, in half its time."""
    if eps == 0:
        return (r / z).masked_fill_(z == 0, 0.0)
    return r / (z >= 0).to(z.dtype).mul_(2 * eps).sub_(eps).add_(z)  # +-eps exactly, then + z


# ----------------------------------------------------------------------------- rewards
def softmax_loss_reward(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """r = z o (onehot - softmax(z)), read off the cross-entropy gradient (= -z o grad)."""
    return -z * grad


def negative_gradient_reward(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """r = -dL/dz: the loss gradient itself as the reward (for losses other than softmax-CE)."""
    return -grad


def snn_rate_coded_reward(z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The LFP authors' SnnCorrectClassRewardSpikesRateCoded (lfprop 1.0.0 rewards/
    reward_functions.py:278-318) on a (batch, classes, steps) spike train z: at every step the
    true class gets 1 - sigmoid(count - steps // 2), whether it spiked or not, and every other
    class that spiked gets -(1 - sigmoid(silent steps - steps // 2)). The true class is read
    off a cross-entropy gradient (its only negative entry), as softmax_loss reads it; returned
    over the batch size like the other rewards (reward_scale "sum" gives the authors' own)."""
    if z.dim() != 3:
        raise ValueError(f"reward snn_rate_coded takes a (batch, classes, steps) spike train (a spiking net "
                         f"with readout: steps), got shape {tuple(z.shape)}")
    steps = z.shape[2]
    true_class = grad.sum(2, keepdim=True) < 0
    pos_decay = 1 - torch.sigmoid(z.sum(2, keepdim=True) - steps // 2)
    neg_decay = 1 - torch.sigmoid((z - 1).abs().sum(2, keepdim=True) - steps // 2)
    reward = torch.where(true_class, pos_decay.expand_as(z), -z * neg_decay)
    return reward / z.shape[0]


REWARDS = {"softmax_loss": softmax_loss_reward, "negative_gradient": negative_gradient_reward,
           "snn_rate_coded": snn_rate_coded_reward}
SNN_MODES = ("pass", "membrane")


REWARD_SCALES = ("mean", "sum")


class _OutputReward(torch.autograd.Function):
    """Identity in the forward pass; turns the loss gradient at the output into the reward.

    reward_scale "mean": the reward read off the mean loss, i.e. the per-sample reward / B;
    "sum": the per-sample reward itself, which the authors' SoftmaxLossReward hands to every
    sample (lfprop 1.0.0, rewards/reward_functions.py), so feedback is summed over the batch.
    """

    @staticmethod
    def forward(ctx, z, reward_name, reward_scale="mean"):
        ctx.save_for_backward(z)
        ctx.reward_name, ctx.reward_scale = reward_name, reward_scale
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        reward = REWARDS[ctx.reward_name](z, grad)
        if ctx.reward_scale == "sum":  # undo the mean loss's 1/B: each sample's own reward
            reward = reward * z.shape[0]
        return reward, None, None


class _PassReward(torch.autograd.Function):
    """Forward: the activation's output. Backward: the reward goes to its input unchanged.

    The output shares y's memory instead of copying it (one activation-sized pass fewer per
    layer). The hook hands in y detached, so the activation's own node, which saved y for a
    backward that never runs, is not in the graph: an in-place op on the output (a residual
    `out += skip`, an in-place dropout) cannot trip its version check."""

    @staticmethod
    def forward(ctx, x, y):
        return y.detach()

    @staticmethod
    def backward(ctx, reward):
        return reward, None


class _MembraneReward(torch.autograd.Function):
    """The LFP authors' epsilon rule through one LIF step (lfprop 1.0.0 propagation/
    propagator_snn.py:140-225, LFPEpsilonSNN). Forward: the spikes. Backward: the reward on
    the spikes, plus the share the next step handed back to this step's membrane, counts as
    reward on the new membrane u_t = beta u_t-1 + I_t - reset; it is normalised by
    |u_t-1| + |u_t + reset - u_t-1| + eps, the normalised reward s goes to the input current
    (the layer in front applies it without dividing again: EpsilonPropagation(normalised=True)), and
    beta s u_t-1 is carried to the step before. Steps must come back in reverse order, as
    autograd runs them; `carry` holds the hand-back between steps of one forward pass."""

    @staticmethod
    def forward(ctx, current, spikes, before, after, reset_term, beta, carry, step, eps):
        ctx.save_for_backward(before, after, reset_term)
        ctx.beta, ctx.carry, ctx.step, ctx.eps = beta, carry, step, eps
        return spikes.detach().clone()

    @staticmethod
    def backward(ctx, reward):
        before, after, reset_term = ctx.saved_tensors
        carry = ctx.carry
        if carry["next"] is not None and ctx.step != carry["next"]:
            raise RuntimeError(f"LFP snn membrane: step {ctx.step} came back before step {carry['next']}")
        total = reward if carry["rho"] is None else reward + carry["rho"]
        s = total / (before.abs() + (after + reset_term - before).abs() + ctx.eps)
        carry["rho"], carry["next"] = ctx.beta * s * before, ctx.step - 1
        return s, None, None, None, None, None, None, None, None


class _ProportionalSum(torch.autograd.Function):
    """y = a + b; each summand gets its share of the reward, a o r / (a + b) (eps rule)."""

    @staticmethod
    def forward(ctx, a, b, eps):
        y = a + b
        ctx.save_for_backward(a, b, y)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, reward):
        a, b, y = ctx.saved_tensors
        s = _divide(reward, y, ctx.eps)
        return a * s, b * s, None


class _BatchNormReward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, weight, bias, module, eps):
        if module.training or not module.track_running_stats:  # the batch statistics, in one pass
            _, mean, inv_sigma = torch.native_batch_norm(x, None, None, None, None, True, 0.0, module.eps)
        else:
            mean, inv_sigma = module.running_mean, (module.running_var + module.eps).rsqrt()
        ctx.save_for_backward(x, y, weight, bias, mean, inv_sigma)  # fp32 statistics, as before for running ones
        ctx.eps = eps
        return y.detach().clone()  # a copy: y is saved, and the next op may be an in-place ReLU

    @staticmethod
    def backward(ctx, reward):
        x, y, weight, bias, mean, inv_sigma = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        inv_sigma = inv_sigma.reshape(shape)
        s = _divide(reward, y, ctx.eps)
        gamma = weight.reshape(shape) if weight is not None else 1.0
        r_x = x * gamma * inv_sigma * s
        grad_w = grad_b = None
        if weight is not None:
            x_hat = (x - mean.reshape(shape)) * inv_sigma
            grad_w = -weight.abs() * (x_hat * s).sum(dims)
        if bias is not None:
            grad_b = -bias.abs() * s.sum(dims)
        return r_x, None, grad_w, grad_b, None, None


class _AvgPoolReward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, module, eps):
        ctx.save_for_backward(x, y)
        ctx.module, ctx.eps = module, eps
        return y.detach().clone()

    @staticmethod
    def backward(ctx, reward):
        x, y = ctx.saved_tensors
        s = _divide(reward, y, ctx.eps)
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            pooled = type(ctx.module).forward(ctx.module, x_)  # not module(x_): no hooks again
            (spread,) = torch.autograd.grad(pooled, x_, s)
        return x * spread, None, None, None


# ----------------------------------------------------------------------------- layers
def _pos(t):
    return t.clamp(min=0)


def _neg(t):
    return t.clamp(max=0)


class _LinearOps:
    """The primitives every variant is built from, for a Linear layer."""

    channel_dim = -1  # where a layer's outputs sit in z
    pair_dim = -2  # the stacked [z+, z-] pair's axis after splitting the outputs into (2, J)

    def __init__(self, x):
        self.x = x

    @staticmethod
    def forward(x, w):
        return x @ w.t()

    @staticmethod
    def layer(x, w, b):
        return F.linear(x, w, b)

    def send(self, s, w):  # sum_j w_ij s_j, in the input's shape
        return s @ w

    def collect(self, s, x):  # sum_n s_nj x_ni, in the weight's shape
        return s.reshape(-1, s.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    def send_collect(self, s, w, x, need_input):
        """(send(s, w) or None, collect(s, x)): both products of one backward step."""
        return self.send(s, w) if need_input else None, self.collect(s, x)

    @staticmethod
    def bias_view(b, like):
        return b

    @staticmethod
    def bias_sum(s):
        return s.reshape(-1, s.shape[-1]).sum(0)


class _ConvOps:
    channel_dim = 1
    pair_dim = 1

    def __init__(self, x, conv, weight):
        self.x, self.conv, self.weight = x, conv, weight  # conv = (stride, padding, dilation, groups)

    def forward(self, x, w):
        return self.layer(x, w, None)

    def layer(self, x, w, b):
        stride, padding, dilation, groups = self.conv
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    def _backward(self, s, x, w, mask):
        stride, padding, dilation, groups = self.conv
        return torch.ops.aten.convolution_backward(
            s, x, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups, mask)

    def send(self, s, w):
        return self._backward(s, self.x, w, [True, False, False])[0]

    def collect(self, s, x):
        return self._backward(s, x, self.weight, [False, True, False])[1]

    def send_collect(self, s, w, x, need_input):
        """Both products from one convolution_backward call: the same values as two calls
        (each computes its own output alone), in about half the time on CPU."""
        grads = self._backward(s, x, w, [need_input, True, False])
        return grads[0], grads[1]

    @property
    def groups(self):
        return self.conv[3]

    @staticmethod
    def bias_view(b, like):
        return b.reshape(1, -1, 1, 1)

    @staticmethod
    def bias_sum(s):
        return s.sum((0, 2, 3))


def signed_pieces(ops, x, w_pos, w_neg):
    """(z+, z-) without their bias pieces, for any sign of x: four products."""
    x_pos, x_neg = _pos(x), _neg(x)
    return (ops.forward(x_pos, w_pos) + ops.forward(x_neg, w_neg),
            ops.forward(x_pos, w_neg) + ops.forward(x_neg, w_pos))


def split_messages(ops, x, w_pos, w_neg, b_pos, b_neg, reward, a, b, need_input=True, pieces=None):
    """(reward to the input, weight share, s+, s-) of the split variants, for any sign of x;
    the reward to the input is None when nothing consumes it (need_input False). `pieces`:
    signed_pieces' result, when the layer's forward already computed it (SplitPropagation)."""
    x_pos, x_neg = _pos(x), _neg(x)
    p_pos, p_neg = signed_pieces(ops, x, w_pos, w_neg) if pieces is None else pieces
    z_pos, z_neg = p_pos + b_pos, p_neg + b_neg
    s_pos = reward / (z_pos + STABILISER)
    s_neg = reward / (z_neg - STABILISER)
    r_in = None if not need_input else \
        a * (x_pos * ops.send(s_pos, w_pos) + x_neg * ops.send(s_pos, w_neg)) \
        - b * (x_neg * ops.send(s_neg, w_pos) + x_pos * ops.send(s_neg, w_neg))
    share = a * (w_pos * ops.collect(s_pos, x_pos) + w_neg * ops.collect(s_pos, x_neg)) \
        - b * (w_pos * ops.collect(s_neg, x_neg) + w_neg * ops.collect(s_neg, x_pos))
    return r_in, share, s_pos, s_neg


def nonnegative_pieces(ops, x, w_pos, w_neg):
    """(z+, z-) without their bias pieces, for x >= 0: two products."""
    return ops.forward(x, w_pos), ops.forward(x, w_neg)


def split_messages_nonnegative(ops, x, w_pos, w_neg, b_pos, b_neg, reward, a, b, need_input=True, pieces=None):
    """split_messages for x >= 0 (behind a ReLU: every layer but the first). x- is exactly 0,
    so the six products with it are exact zeros: skipping them halves the work and gives the
    same values bit for bit (tests/test_lfp.py)."""
    p_pos, p_neg = nonnegative_pieces(ops, x, w_pos, w_neg) if pieces is None else pieces
    z_pos, z_neg = p_pos + b_pos, p_neg + b_neg
    s_pos = reward / (z_pos + STABILISER)
    s_neg = reward / (z_neg - STABILISER)
    r_in = None if not need_input else a * (x * ops.send(s_pos, w_pos)) - b * (x * ops.send(s_neg, w_neg))
    share = a * (w_pos * ops.collect(s_pos, x)) - b * (w_neg * ops.collect(s_neg, x))
    return r_in, share, s_pos, s_neg


def _stacked_weights(w_pos, w_neg, signed):
    """The stacked layer's weights: outputs [z+, z-] from inputs [x+, x-] ([[w+, w-], [w-, w+]]),
    or from x alone when x >= 0 ([w+, w-])."""
    if signed:
        return torch.cat([torch.cat([w_pos, w_neg], 1), torch.cat([w_neg, w_pos], 1)], 0)
    return torch.cat([w_pos, w_neg], 0)


def stacked_pieces(ops, x, w_pos, w_neg):
    """([z+, z-],) or, for a signed x, ([z+, z-], [x+, x-]): z+ and z- without their bias
    pieces, side by side on ops.pair_dim, from one product of the layer stacked from the
    sign pieces; the stacked input is kept so the backward neither concatenates it again
    nor scans x for its sign again."""
    signed = bool(x.lt(0).any())
    x_in = torch.cat([_pos(x), _neg(x)], ops.channel_dim) if signed else x
    pair = ops.forward(x_in, _stacked_weights(w_pos, w_neg, signed)).unflatten(ops.channel_dim, (2, w_pos.shape[0]))
    return (pair, x_in) if signed else (pair,)


def split_messages_stacked(ops, x, w_pos, w_neg, b_pos, b_neg, reward, a, b, need_input=True, pieces=None):
    """split_messages in two products instead of up to twelve. The sign pieces are stacked
    into one layer (_stacked_weights): one forward gives z+ and z-, and one backward step (with
    the rows scaled by a and -b) both the reward to the input and the weight shares. The same
    sums as split_messages in another order, so equal to rounding (tests/test_lfp.py); no
    activation-sized concatenation but the first layer's [x+, x-]. `pieces`: stacked_pieces'
    result, when the layer's forward already computed it (SplitPropagation)."""
    pair, *stacked_input = stacked_pieces(ops, x, w_pos, w_neg) if pieces is None else pieces
    signed = bool(stacked_input)
    if signed:
        x_in = stacked_input[0]
        x_pos, x_neg = x_in.chunk(2, ops.channel_dim)
        w_scaled = torch.cat([a * torch.cat([w_pos, w_neg], 1), -b * torch.cat([w_neg, w_pos], 1)], 0)
    else:
        x_in, w_scaled = x, torch.cat([a * w_pos, -b * w_neg], 0)
    pair_dim = ops.pair_dim  # z+ and z- side by side on this axis: (..., 2, J) or (B, 2, J, H, W)
    z = torch.empty_like(pair)  # the stabilised pieces, in one pass; the saved pair stays as it is
    for side, offset in ((0, b_pos + STABILISER), (1, b_neg - STABILISER)):
        torch.add(pair.select(pair_dim, side), offset, out=z.select(pair_dim, side))
    s = reward.unsqueeze(pair_dim) / z
    sent, collected = ops.send_collect(s.flatten(*sorted((pair_dim, pair_dim + 1))), w_scaled, x_in, need_input)
    top, bottom = collected.chunk(2, 0)  # s+ and s- against the inputs
    if signed:
        (pp, pn), (np_, nn_) = top.chunk(2, 1), bottom.chunk(2, 1)  # [x+, x-] columns
        share = a * (w_pos * pp + w_neg * pn) - b * (w_pos * nn_ + w_neg * np_)
        if sent is not None:
            sent_pos, sent_neg = sent.chunk(2, ops.channel_dim)
            r_in = x_pos * sent_pos + x_neg * sent_neg
        else:
            r_in = None
    else:
        share = a * (w_pos * top) - b * (w_neg * bottom)
        r_in = None if sent is None else x * sent
    s_pos, s_neg = s.unbind(pair_dim)
    return r_in, share, s_pos, s_neg


class EpsilonPropagation:
    """LFP-eps (and LFP-0, eps = 0): s = R / (z + eps sign z); the reward to the input is
    x o (W^T s) and the weight's feedback |W| o (s x^T). `normalised`: the LIF behind the
    layer already divided its reward (snn "membrane"), so s = R."""

    def __init__(self, eps: float, normalised: bool = False):
        self.eps, self.normalised = eps, normalised

    @staticmethod
    def layer_forward(ops, x, weight, bias):
        """(the layer's output z, the tensors its backward reads: (z,), no form): the layer's own z."""
        z = ops.layer(x, weight, bias)
        return z, (z,), None

    def __call__(self, ops, x, weight, bias, saved, reward, need_input=True, form=None):
        """(reward to the input, weight feedback F, bias feedback F_b) of one layer. The reward
        to the input costs a transposed product per layer; the first layer's input (the data)
        takes none, so it is skipped there (need_input False), as autograd skips BP's."""
        (z,) = saved
        s = reward if self.normalised else _divide(reward, z, self.eps)
        sent, collected = ops.send_collect(s, weight, x, need_input)
        r_in = None if sent is None else x * sent
        f_w = collected.mul_(weight.abs())  # a fresh product: scaled in place
        f_b = None if bias is None else bias.abs() * ops.bias_sum(s)
        return r_in, f_w, f_b


def _split(ops, x):
    """Which form of the split messages a layer takes. Conv layers stack the sign pieces (their
    weights are small next to their activations, so the stacked weights cost little and one
    call replaces up to twelve). Linear layers keep separate products: there the weights are
    often larger than the batch's activations, and stacking them each step cost more than it
    saved (the MLP bench step went from about 4 to 8 times BP's)."""
    if isinstance(ops, _ConvOps) and ops.groups == 1:
        return split_messages_stacked
    return split_messages_nonnegative if not bool(x.lt(0).any()) else split_messages


_PIECES = {split_messages: signed_pieces, split_messages_nonnegative: nonnegative_pieces,
           split_messages_stacked: stacked_pieces}  # what each form's forward saves


class SplitPropagation:
    """LFP-alpha-beta (a = alpha, b = beta) and LFP-z+z- (a = 1/2, b = -1/2): the message
    R_ij = a (w x)+_ij s+_j - b (w x)-_ij s-_j, with (w x)+ = w+ x+ + w- x- and
    (w x)- = w+ x- + w- x+, each sign normalised by its own z."""

    def __init__(self, a: float, b: float):
        self.a, self.b = a, b

    @staticmethod
    def layer_forward(ops, x, weight, bias):
        """(z, the pieces z+ and z- without bias, the form of the messages). Behind a ReLU and in
        stacked conv layers the output is z+ + z- (+ bias): the backward reuses the pieces
        instead of computing them again (one product of the layer per step less, of seven;
        the price is one more activation-sized tensor kept per layer), and z is the layer's
        own to rounding, not to the bit. A Linear layer with a signed input keeps its own z
        and its backward makes the four pieces: there the clamps of x and the sum cost more
        than the one product saved (the bench's transformer, whose layers sit behind
        LayerNorm and GELU, took 2.92 x BP's step that way against 2.69, one measurement)."""
        form = _split(ops, x)
        if form is split_messages:
            return ops.layer(x, weight, bias), (), form
        pieces = _PIECES[form](ops, x, _pos(weight), _neg(weight))
        z_pos, z_neg = pieces[0].unbind(ops.pair_dim) if form is split_messages_stacked else pieces
        z = z_pos + z_neg
        return (z if bias is None else z.add_(ops.bias_view(bias, z))), pieces, form

    def __call__(self, ops, x, weight, bias, saved, reward, need_input=True, form=None):
        """As EpsilonPropagation's; `saved` and `form` as layer_forward gave them (the form is
        found again from x when not given)."""
        a, b = self.a, self.b
        w_pos, w_neg = _pos(weight), _neg(weight)
        b_pos = 0.0 if bias is None else ops.bias_view(_pos(bias), reward)
        b_neg = 0.0 if bias is None else ops.bias_view(_neg(bias), reward)
        messages = form or _split(ops, x)
        r_in, share, s_pos, s_neg = messages(ops, x, w_pos, w_neg, b_pos, b_neg, reward, a, b, need_input,
                                             pieces=saved or None)
        f_w = torch.sign(weight) * share
        f_b = None
        if bias is not None:
            f_b = torch.sign(bias) * (a * _pos(bias) * ops.bias_sum(s_pos) - b * _neg(bias) * ops.bias_sum(s_neg))
        return r_in, f_w, f_b


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _saved_in_weight_dtype(ctx, reward):
    """(x, weight, bias, the propagation's saved tensors, reward, x's dtype). Under autocast
    the forward saw bf16 activations and fp32 weights: the reward is distributed in the
    weight's precision (no autocast runs in backward) and handed back in the input's."""
    x, weight, bias, *saved = ctx.saved_tensors
    saved = tuple(t.to(weight.dtype) for t in saved)
    return x.to(weight.dtype), weight, bias, saved, reward.to(weight.dtype), x.dtype


class LFPLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, propagation):
        z, saved, ctx.form = propagation.layer_forward(_LinearOps(x), x, weight, bias)
        ctx.save_for_backward(x, weight, bias, *saved)
        ctx.propagation = propagation
        return z

    @staticmethod
    def backward(ctx, reward):
        x, weight, bias, saved, reward, in_dtype = _saved_in_weight_dtype(ctx, reward)
        r_in, f_w, f_b = ctx.propagation(_LinearOps(x), x, weight, bias, saved, reward, form=ctx.form,
                                         need_input=ctx.needs_input_grad[0])
        return _to(r_in, in_dtype), f_w.neg_(), None if f_b is None else f_b.neg_(), None


class LFPConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, propagation, stride, padding, dilation, groups):
        z, saved, ctx.form = propagation.layer_forward(_ConvOps(x, (stride, padding, dilation, groups), weight), x,
                                                       weight, bias)
        ctx.save_for_backward(x, weight, bias, *saved)
        ctx.propagation, ctx.conv = propagation, (stride, padding, dilation, groups)
        return z

    @staticmethod
    def backward(ctx, reward):
        x, weight, bias, saved, reward, in_dtype = _saved_in_weight_dtype(ctx, reward)
        ops = _ConvOps(x, ctx.conv, weight)
        r_in, f_w, f_b = ctx.propagation(ops, x, weight, bias, saved, reward, form=ctx.form,
                                         need_input=ctx.needs_input_grad[0])
        return _to(r_in, in_dtype), f_w.neg_(), None if f_b is None else f_b.neg_(), None, None, None, None, None


# ----------------------------------------------------------------------------- the rules
class _OutOfPlace:
    """An in-place activation (torchvision's ReLU(inplace=True)) runs out of place while the
    rule is applied: in place it would overwrite the z that the layer before it saved for
    the reward's division. The same values; remove() puts `inplace` back."""

    def __init__(self, module: nn.Module):
        self.module = module
        module.inplace = False

    def remove(self) -> None:
        self.module.inplace = True


class LayerwiseFeedbackPropagation(Rule):
    """Shared machinery of the LFP variants; each subclass says how a layer propagates
    (propagation(): an EpsilonPropagation or a SplitPropagation)."""

    feedback_replaces_weight = False
    defaults = {"eps": 1e-6, "reward": "softmax_loss", "reward_scale": "mean", "clip_update_norm": None}

    def validate_options(self) -> None:
        o = self.options
        if o["reward"] not in REWARDS:
            raise ValueError(f"rule {self.name!r}: unknown reward {o['reward']!r}; choices: {', '.join(REWARDS)}")
        eps = o.get("eps", 0.0)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"rule {self.name!r}: eps must be a number >= 0, got {eps!r}")
        clip = o["clip_update_norm"]
        if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip <= 0):
            raise ValueError(f"rule {self.name!r}: clip_update_norm must be a number > 0 or null")
        if o.get("reward_scale", "mean") not in REWARD_SCALES:
            raise ValueError(f"rule {self.name!r}: reward_scale must be one of {', '.join(REWARD_SCALES)}, "
                             f"got {o['reward_scale']!r}")
        if o.get("snn", "pass") not in SNN_MODES:
            raise ValueError(f"rule {self.name!r}: snn must be one of {', '.join(SNN_MODES)}, got {o['snn']!r}")

    def propagation(self):
        return EpsilonPropagation(float(self.options.get("eps", 0.0)))

    def forward(self, layer, x):
        if not torch.is_grad_enabled():
            return layer._bpfree_original_class.forward(layer, x)
        if id(layer) in getattr(self, "_feeds_membrane", ()):
            propagation = EpsilonPropagation(float(self.options.get("eps", 0.0)), normalised=True)
        else:
            propagation = self.propagation()
        if isinstance(layer, CONV_LAYERS):
            c = conv2d_call(layer, x)
            return c.output(LFPConv2dFunction.apply(c.x, c.lift(layer.weight), layer.bias, propagation, *c.args))
        return LFPLinearFunction.apply(x, layer.weight, layer.bias, propagation)

    def _membrane_pairs(self, model: nn.Module, layers) -> set[int]:
        """Option snn "membrane": every LIF must sit right behind a converted Linear/Conv2d (the
        authors' SpikingLayer) and reset as snnTorch does; the ids of those layers."""
        converted, feeds = {id(layer) for layer in layers}, set()
        for parent in model.modules():
            names = list(parent._modules)
            for i, name in enumerate(names):
                child = parent._modules[name]
                if not getattr(child, "bpfree_membrane", False):
                    continue
                before = parent._modules[names[i - 1]] if i > 0 else None
                if before is None or id(before) not in converted:
                    raise ValueError(f"rule {self.name!r} with snn membrane: LIF {name!r} must follow a Linear or "
                                     f"Conv2d layer directly, it follows {type(before).__name__}")
                if getattr(child, "reset_mode", None) != "snntorch":
                    raise ValueError(f"rule {self.name!r} with snn membrane needs LIF reset snntorch, "
                                     f"{name!r} has {getattr(child, 'reset_mode', None)!r}")
                feeds.add(id(before))
        return feeds

    def attach(self, model: nn.Module, layers) -> list:
        """Output reward, pass-through activations (or the membrane rule at LIFs), proportional
        sums and average pools."""
        eps = float(self.options.get("eps", 0.0))  # sums and pools use the layers' eps
        membrane = self.options.get("snn", "pass") == "membrane"
        self._feeds_membrane = self._membrane_pairs(model, layers) if membrane else set()
        handles = [model.register_forward_hook(self._output_hook)]
        for module in model.modules():
            if module is model:
                continue
            if membrane and getattr(module, "bpfree_membrane", False):
                handles.append(module.register_forward_hook(self._membrane_hook))
            elif isinstance(module, ACTIVATION_CLASSES) or getattr(module, "bpfree_activation", False):
                handles.append(module.register_forward_hook(self._activation_hook))
                if getattr(module, "inplace", False):
                    handles.append(_OutOfPlace(module))
            elif type(module).__name__ == "Add":
                handles.append(module.register_forward_hook(self._add_hook))
            elif isinstance(module, AVG_POOLS) or getattr(module, "bpfree_proportional_pool", False):
                handles.append(module.register_forward_hook(self._pool_hook))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                handles.append(module.register_forward_hook(self._batchnorm_hook))
        self._sum_eps = eps
        return handles

    def _on(self) -> bool:
        return torch.is_grad_enabled() and self.active

    def _output_hook(self, module, inputs, output):
        if self._on() and isinstance(output, torch.Tensor):
            return _OutputReward.apply(output, self.options["reward"], self.options["reward_scale"])
        return output

    def _activation_hook(self, module, inputs, output):
        if not self._on():
            return output
        return _PassReward.apply(inputs[0], output.detach())  # no edge to the activation's node

    def _membrane_hook(self, module, inputs, output):
        if not self._on():
            return output
        if module.step == 1:  # a new forward pass: a fresh hand-back between its steps
            module._bpfree_carry = {"rho": None, "next": None}
        before, after, reset_term = module.last_step
        return _MembraneReward.apply(inputs[0], output, before, after, reset_term, module.beta,
                                     module._bpfree_carry, module.step, float(self.options.get("eps", 0.0)))

    def _add_hook(self, module, inputs, output):
        if self._on() and len(inputs) == 2:
            return _ProportionalSum.apply(inputs[0], inputs[1], self._sum_eps)
        return output

    def _batchnorm_hook(self, module, inputs, output):
        if not self._on():
            return output
        return _BatchNormReward.apply(inputs[0], output, module.weight, module.bias, module, self._sum_eps)

    def _pool_hook(self, module, inputs, output):
        return _AvgPoolReward.apply(inputs[0], output, module, self._sum_eps) if self._on() else output

    def before_step(self, layers) -> None:
        """The authors' update-norm clipping, on the feedback of all converted layers."""
        clip = self.options["clip_update_norm"]
        if clip is not None:
            params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
            torch.nn.utils.clip_grad_norm_(params, clip)


@register_rule
class LFPZero(LayerwiseFeedbackPropagation):
    """LFP-0: the eps rule with eps = 0 (equals -|W| o dL/dW on bias-free ReLU nets, E1)."""

    name = "lfp0"
    defaults = {"reward": "softmax_loss", "reward_scale": "mean", "clip_update_norm": None}


@register_rule
class LFPEpsilon(LayerwiseFeedbackPropagation):
    """LFP-eps: relevance through each layer by the epsilon rule (the stabiliser keeps z away from 0)."""

    name = "lfp_eps"
    defaults = {"eps": 1e-6, "reward": "softmax_loss", "reward_scale": "mean", "clip_update_norm": None,
                "snn": "pass"}


@register_rule
class LFPAlphaBeta(LayerwiseFeedbackPropagation):
    """LFP-alpha-beta: positive and negative contributions weighted alpha and beta (alpha - beta = 1)."""

    name = "lfp_ab"
    defaults = {"alpha": 2.0, "beta": 1.0, "reward": "softmax_loss", "reward_scale": "mean", "clip_update_norm": None}

    def propagation(self):
        return SplitPropagation(float(self.options["alpha"]), float(self.options["beta"]))

    def validate_options(self) -> None:
        super().validate_options()
        a, b = self.options["alpha"], self.options["beta"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) \
                or b < 0 or abs(a - b - 1.0) > 1e-9:
            raise ValueError(f"rule 'lfp_ab': needs alpha - beta = 1 with beta >= 0, got alpha={a}, beta={b}")


@register_rule
class LFPZPlusZMinus(LayerwiseFeedbackPropagation):
    """LFP-z+z-: positive and negative contributions normalised separately (the z+ / z- split)."""

    name = "lfp_zpzm"
    defaults = {"reward": "softmax_loss", "reward_scale": "mean", "clip_update_norm": None}

    def propagation(self):
        return SplitPropagation(0.5, -0.5)
