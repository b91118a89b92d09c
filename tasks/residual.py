"""Runs a decoder model as a chain of residual units (`layers.N.attn`, `layers.N.mlp`).

One code path serves scoring and evaluation, so a skipped unit and a deleted one give the same numbers,
and a candidate can be evaluated from the hidden state entering it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from tasks.stream.residency import EMBED, HEAD, hold, hold_layer, streamed
from tasks.surgery import architecture_of, layer_ids, removed_units
from tasks.surgery.adapted import adapter_ranks, get_adapter
from tasks.surgery.architecture import ForwardContext
from tasks.surgery.residual_adapters import placement


@dataclass(frozen=True)
class Unit:
    id: str
    position: int
    part: str
    # Half of a parallel layer (GPT-NeoX): it reads the layer input, not the state after its sibling.
    parallel: bool = False
    # A recovery adapter standing in for the removed unit `id` (part: its slot, or "layer" before/after layers).
    adapter: bool = False


class ResidualRunner:
    """Runs units one at a time: `apply(unit, h, ctx)` is h + delta(h), for any chain of units.

    Parallel layers (GPT-NeoX) compute h + attn(h) + mlp(h): the MLP reads the layer input, not the state
    after the attention. The runner remembers, for every state its attention unit returned, the layer
    input that attention read; the MLP applied to that very tensor reads the same input. An MLP applied
    to any other tensor reads that tensor: its attention was skipped or removed, so the state entering
    the MLP is the layer input. Every caller that chains `apply` (scorers, benchmarks) is thus exact
    without knowing about parallel layers, as long as it hands the attention's output tensor on as is;
    a caller that copies or moves states in between passes `layer_input` itself.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter = architecture_of(model)
        self.layers = self.adapter.decoder_layers(model)
        parallel = self.adapter.is_parallel(model)
        self.units: list[Unit] = _units(model, parallel)
        # Output of a parallel attention unit -> (its layer position, the layer input it read). Keyed by
        # tensor identity, held weakly: an entry lives exactly as long as the caller keeps that state.
        self._layer_inputs: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # Scorers may run candidates on several threads: buffers are per thread, the map is locked.
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def _workspace(self) -> "Workspace":
        if not hasattr(self._local, "workspace"):
            self._local.workspace = Workspace()
        return self._local.workspace

    def _remember(self, out: torch.Tensor, position: int, layer_input: torch.Tensor) -> None:
        with self._lock:
            self._layer_inputs[out] = (position, layer_input)

    def _remembered(self, hidden: torch.Tensor) -> tuple[int | None, torch.Tensor | None]:
        with self._lock:
            return self._layer_inputs.get(hidden, (None, None))

    def active(self, removed: set[str]) -> list[Unit]:
        """The units left when `removed` are skipped, in model order."""
        return [u for u in self.units if u.id not in removed]

    @property
    def device(self) -> torch.device:
        weights = streamed(self.model)
        return weights.device if weights is not None else next(self.model.parameters()).device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with hold(self.model, EMBED):
            return self.adapter.embed(self.model, input_ids.to(self.device))

    def context(self, hidden: torch.Tensor) -> ForwardContext:
        return self.adapter.context(self.model, hidden)

    def apply(
        self, unit: Unit, hidden: torch.Tensor, ctx: ForwardContext, layer_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        if unit.adapter:
            return self._apply_adapter(unit, hidden)
        with hold_layer(self.model, self.layers[unit.position]):
            return self._apply_layer(unit, hidden, ctx, layer_input)

    def _apply_layer(
        self, unit: Unit, hidden: torch.Tensor, ctx: ForwardContext, layer_input: torch.Tensor | None
    ) -> torch.Tensor:
        layer = self.layers[unit.position]
        if not unit.parallel:
            delta_fn = self.adapter.attn_delta if unit.part == "attn" else self.adapter.mlp_delta
            return hidden + delta_fn(layer, hidden, ctx, unit.position)
        if unit.part == "attn":
            out = hidden + self.adapter.attn_delta(layer, hidden, ctx, unit.position)
            self._remember(out, unit.position, hidden)
            return out
        if layer_input is None:
            position, remembered = self._remembered(hidden)
            layer_input = remembered if position == unit.position else hidden
        return hidden + self.adapter.mlp_delta(layer, layer_input, ctx, unit.position)

    def _apply_adapter(self, unit: Unit, hidden: torch.Tensor) -> torch.Tensor:
        adapter = get_adapter(self.model, unit.id)
        if not unit.parallel or unit.part == "layer":
            return adapter(hidden)
        if unit.part == "attn":
            out = adapter(hidden)
            self._remember(out, unit.position, hidden)
            return out
        position, remembered = self._remembered(hidden)
        return hidden + adapter.delta(remembered if position == unit.position else hidden)

    def run(self, hidden: torch.Tensor, ctx: ForwardContext, units: Iterable[Unit]) -> torch.Tensor:
        for unit in units:
            hidden = self.apply(unit, hidden, ctx)
        return hidden

    def window_nll(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, mass: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Summed next-token NLL of every window (float64, shape [batch]); windows go one at a time.

        `mass`, when given, gets each vocabulary entry's predicted probability added, summed over positions.
        The same numbers as cross-entropy over the family's own logits, bit for bit: only the buffers differ.
        """
        targets = input_ids.to(hidden.device)[:, 1:]
        sums = []
        # Kept buffers cannot carry gradients (Taylor scores differentiate this sum): fresh tensors then.
        reuse = not torch.is_grad_enabled()
        with hold(self.model, EMBED, HEAD):
            for row in range(hidden.shape[0]):
                sums.append(self._row_nll(hidden[row, :-1], targets[row], reuse, mass))
        return torch.stack(sums)

    def _row_nll(self, hidden: torch.Tensor, targets: torch.Tensor, reuse: bool, mass: torch.Tensor | None) -> torch.Tensor:
        if reuse:
            logits = self._logits(hidden).float()
            log_probs = self._workspace.take("log_probs", logits)
            torch.log_softmax(logits, dim=-1, out=log_probs)
        else:
            log_probs = torch.log_softmax(self.adapter.logits(self.model, hidden).float(), dim=-1)
        if mass is not None:
            mass += log_probs.exp().sum(dim=0).to(mass.device)
        return F.nll_loss(log_probs, targets, reduction="sum").double()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The family's logits for one window's positions, written into a kept buffer when the head is a
        plain linear layer: a fresh 50 MB tensor per window costs ~20% of the head in page faults on CPU."""
        head = self.adapter.lm_head(self.model)
        features = self.adapter.head_input(self.model, hidden)
        if type(head) is not nn.Linear:
            return self.adapter.shape_logits(self.model, head(features))
        out = self._workspace.take("logits", features, (features.shape[0], head.weight.shape[0]))
        if head.bias is None:
            torch.mm(features, head.weight.t(), out=out)
        else:
            torch.addmm(head.bias, features, head.weight.t(), out=out)
        return self.adapter.shape_logits(self.model, out)

    @torch.inference_mode()
    def nll(self, input_ids: torch.Tensor, skip: Sequence[str] = ()) -> torch.Tensor:
        """Per-window NLL sums of the model with the units in `skip` left out."""
        skipped = set(skip)
        hidden = self.embed(input_ids)
        ctx = self.context(hidden)
        hidden = self.run(hidden, ctx, (u for u in self.units if u.id not in skipped))
        return self.window_nll(hidden, input_ids)


class Workspace:
    """Named buffers that are reused while shape, dtype and device stay the same."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = tuple(like.shape) if shape is None else shape
        buffer = self._buffers.get(name)
        if buffer is None or tuple(buffer.shape) != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer


def _units(model: nn.Module, parallel: bool) -> list[Unit]:
    """Kept units in order, with recovery adapters where their removed units were (see `placement`)."""
    gone = removed_units(model)
    ids = layer_ids(model)
    plan = placement(ids, list(adapter_ranks(model)))
    units: list[Unit] = []
    for position, lid in enumerate(ids):
        units += [Unit(u, position, "layer", parallel, adapter=True) for u in plan.before.get(position, [])]
        for part, slots in (("attn", plan.attn), ("mlp", plan.mlp)):
            unit = f"layers.{lid}.{part}"
            if unit not in gone:
                units.append(Unit(unit, position, part, parallel))
            elif position in slots:
                units.append(Unit(unit, position, part, parallel, adapter=True))
    units += [Unit(u, len(ids) - 1, "layer", parallel, adapter=True) for u in plan.after]
    return units


def predictions(windows: torch.Tensor) -> int:
    return windows.shape[0] * (windows.shape[1] - 1)


def perplexity(model: nn.Module, windows: torch.Tensor, batch_windows: int = 4, skip: Sequence[str] = (),
               on_windows: Callable[[int, int], None] | None = None) -> float:
    """exp of the mean next-token NLL over all windows; `on_windows(done, total)` follows each micro-batch."""
    runner = ResidualRunner(model)
    total, done = 0.0, 0
    for batch in windows.split(batch_windows):
        total += float(runner.nll(batch, skip).sum())
        done += batch.shape[0]
        if on_windows is not None:
            on_windows(done, windows.shape[0])
    return float(torch.exp(torch.tensor(total / predictions(windows), dtype=torch.float64)))
