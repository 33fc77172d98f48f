"""N downstream probes of one shape trained as one module (docs/DESIGN.md §7.1); one probe is `OneProbe`.

The probes of one downstream task differ only in their input features. `ProbeGroup` stacks their weights along a
first axis of size N and runs each layer as one batched matrix product (`torch.baddbmm`), so N probes cost about
the kernel launches of one; Adam is element-wise, so one Adam over the stacked tensors is N Adams. Probe k computes
MLPProbe's function with its own weights and its own dropout generator, and `probe_state` / `load_probe_state`
move between the stacked tensors and MLPProbe's state_dict, so each probe's checkpoint is a single run's.
`OneProbe` is the group of one: MLPProbe itself behind the same interface, so that one encoder's probe computes
exactly what MLPProbe computes (a batched product of one takes other kernels, equal only within float rounding).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .knn import MLPProbe

LAYERS = ('fc1', 'fc2', 'fc3')
# MLPProbe's parameters in its order (its optimiser's indices): fc1.weight, fc1.bias, fc2.weight, ...
PARAMETERS = tuple(f'{layer}.{kind}' for layer in LAYERS for kind in ('weight', 'bias'))
DROPOUT = 0.5  # MLPProbe's
# Stored transposed, (N, in, out): the batched product's weight gradient xᵀG then lands in the parameter's own layout
# (in MLPProbe's (out, in) layout, autograd would copy every weight gradient out of a transposed view).
TRANSPOSED = ('fc1.weight', 'fc2.weight')


class ProbeGroup(nn.Module):
    """Probes k = 0..N-1, each fc3(relu(fc2(dropout(relu(fc1(x_k)))))) as MLPProbe, on inputs x (N, B, d).

    Weights `<layer>_weight` and biases `<layer>_bias` (N, out): probe k's are MLPProbe's `<layer>.weight` and
    `<layer>.bias`, the weights of fc1 and fc2 stored transposed (N, in, out), fc3's as MLPProbe's (N, out, in). In training mode probe k's dropout draws its mask from `generators[k]` exactly as
    F.dropout draws from the global generator: noise = Bernoulli(1 − p) of the activations' shape, divided by
    1 − p, times the activations.
    """

    def __init__(self, probes: list[MLPProbe], generators: list[torch.Generator]):
        super().__init__()
        if len(probes) != len(generators):
            raise ValueError(f'{len(probes)} probes but {len(generators)} generators')
        for name in PARAMETERS:
            stacked = torch.stack([stored(name, probe.state_dict()[name]) for probe in probes]).detach().clone()
            self.register_parameter(name.replace('.', '_'), nn.Parameter(stacked))
        self.generators = generators

    def __len__(self) -> int:
        return len(self.generators)

    def layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x (N, B, in) -> (N, B, out): bias + x Wᵀ for every probe in one batched product (Wᵀ as stored)."""
        weight_t, bias = getattr(self, f'{name}_weight'), getattr(self, f'{name}_bias')
        return torch.baddbmm(bias.unsqueeze(1), x, weight_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.layer('fc1', x))  # (N, B, h1)
        if self.training:
            noise = torch.stack([torch.empty(hidden.shape[1:], dtype=hidden.dtype, device=hidden.device)
                                 .bernoulli_(1 - DROPOUT, generator=generator) for generator in self.generators])
            hidden = hidden * noise.div_(1 - DROPOUT)
        hidden = F.relu(self.layer('fc2', hidden))  # (N, B, h2)
        # The output layer probe by probe: its weight gradient, Gᵀh with few classes, takes another kernel in a
        # batched product than in MLPProbe's, and the probes would drift from their single runs by float rounding.
        # unbind, not indexing: its backward stacks the N gradients once, where N selects would each scatter into
        # a zero tensor of the whole group's size.
        return torch.stack([F.linear(h, weight, bias) for h, weight, bias
                            in zip(hidden.unbind(0), self.fc3_weight.unbind(0), self.fc3_bias.unbind(0))])

    def probe_state(self, k: int) -> dict[str, torch.Tensor]:
        """Probe k as MLPProbe's state_dict."""
        return {name: stored(name, getattr(self, name.replace('.', '_'))[k].detach()).clone(
            memory_format=torch.contiguous_format) for name in PARAMETERS}

    def load_probe_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in PARAMETERS:
                getattr(self, name.replace('.', '_'))[k].copy_(stored(name, state[name]))

    @staticmethod
    def split_optimizer_state(state: dict, k: int) -> dict:
        return split_optimizer_state(state, k)

    @staticmethod
    def stack_optimizer_states(states: list[dict]) -> dict:
        return stack_optimizer_states(states)


def stored(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """MLPProbe's tensor `name` in the group's layout, or back (the transpose is its own inverse): Wᵀ for the
    TRANSPOSED weights, the tensor itself otherwise."""
    return tensor.transpose(-2, -1) if name in TRANSPOSED else tensor


def split_optimizer_state(state: dict, k: int) -> dict:
    """Probe k's part of the group optimiser's state_dict: the state a single probe's optimiser would hold (its
    per-parameter tensors are slice k of the stacked ones, in MLPProbe's layout; the step count is shared)."""
    def part(index: int, slots: dict) -> dict:
        return {key: stored(PARAMETERS[index], value[k]).clone(memory_format=torch.contiguous_format) if torch.is_tensor(value) and value.dim() > 0
                else value for key, value in slots.items()}
    return {'state': {index: part(index, slots) for index, slots in state['state'].items()},
            'param_groups': state['param_groups']}


def stack_optimizer_states(states: list[dict]) -> dict:
    """The group optimiser's state_dict from its probes' (the inverse of split_optimizer_state)."""
    def stacked(index) -> dict:
        slots = [state['state'][index] for state in states]
        return {key: torch.stack([stored(PARAMETERS[index], slot[key]) for slot in slots])
                if torch.is_tensor(value) and value.dim() > 0 else value for key, value in slots[0].items()}
    return {'state': {index: stacked(index) for index in states[0]['state']},
            'param_groups': states[0]['param_groups']}


class OneProbe(nn.Module):
    """A group of one probe: MLPProbe on inputs (1, B, d), its dropout drawn from the global generator of its
    device, as F.dropout draws; the interface of ProbeGroup, the arithmetic of MLPProbe."""

    def __init__(self, probe: MLPProbe):
        super().__init__()
        self.probe = probe

    def __len__(self) -> int:
        return 1

    @property
    def generators(self) -> list[torch.Generator]:
        """The generator F.dropout draws from: the global one of the probe's device."""
        device = self.probe.fc1.weight.device
        if device.type == 'cpu':
            return [torch.default_generator]
        return [torch.cuda.default_generators[device.index if device.index is not None
                                              else torch.cuda.current_device()]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(x[0]).unsqueeze(0)

    def probe_state(self, k: int) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.probe.state_dict().items()}

    def load_probe_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        self.probe.load_state_dict(state)

    @staticmethod
    def split_optimizer_state(state: dict, k: int) -> dict:
        return state

    @staticmethod
    def stack_optimizer_states(states: list[dict]) -> dict:
        return states[0]
