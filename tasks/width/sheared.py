"""`width.strategy: sheared` (Sheared LLaMA, Xia et al. 2024): learn which layers, heads, MLP channels and
hidden channels to keep, while the weights adapt, so that the model reaches a target shape.

Hard-concrete masks (Louizos et al.; stretch (−0.1, 1.1), temperature 2/3) scale each attention and MLP
half (layer masks), each query head's output, each MLP channel and each hidden channel of the residual
stream (the embedding and every half's output); only the structures the shape shrinks get masks (a gate
on a structure the shape keeps whole would only be folded into its weights). The expected size is
coupled as in the paper: a head costs its projections times the expected hidden width, a channel its
three rows and columns likewise. The masks start open (`init: uniform`, the paper) or at a width
metric's choice (`init: activation`, ...): its top units to the shape open, the rest closed, so the
deterministic mask at step 0 is that metric's plan. Per structure (layers, heads, channels, hidden,
parameters) the Lagrangian λ₁(ŝ − t) + λ₂(ŝ − t)², on sizes relative to the dense model's, pulls the
expected size ŝ to a target t that ramps from the masks' initial expected size to the asked shape over
`warmup` steps; the λ's rise by gradient ascent (their gradient is reversed) while masks and weights
(unless `lr: 0` freezes them) descend on LM loss + penalty. At the end the masks' deterministic values rank every
unit; the top ones to exactly the asked shape are kept (grouped-query attention kept consistent as in
`uniform`), their mask values folded into the weights, and the plan and the trained weights returned.
Training is seeded and resumes from its checkpoints (`tasks.recover.training`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from pydantic import Field, field_validator
from torch import nn

from tasks.recover.data import TrainingStreams
from tasks.recover.training import TrainSettings, lm_loss, train
from tasks.settings import Settings
from tasks.surgery import layer_ids, remove_blocks
from tasks.surgery.width import WidthError, apply_width, dense_widths, width_layout
from tasks.width.importance import WIDTH_METRICS, UnitScores, present_layers
from tasks.width.plan import (Calibration, PlanOutcome, WidthShape, refuse_unprunable_heads,
                              register_width_strategy, resolve_shape, resolved_heads, uniform_plan)

LOW, HIGH, BETA = -0.1, 1.1, 2.0 / 3.0
# A log-alpha of +-OPEN gives a deterministic gate of exactly 1 / 0; P(kept) is ~0.99 / ~0.20.
OPEN = 3.0
# The masks of each structure the shape shrinks (the keys of `_targets`, less "params").
STRUCTURES = {"layers": ("attn", "mlp"), "heads": ("head",), "channels": ("channel",), "hidden": ("hidden",)}


class ShearedSettings(Settings):
    """`width.sheared`: the mask training's budget and rates."""

    steps: int = Field(200, ge=1, le=1_000_000, description="Optimizer steps of mask and weight training.")
    warmup: int = Field(50, ge=0, description="Steps over which the target ramps from dense to the shape.")
    batch_size: int = Field(2, ge=1, le=4096, description="Windows per step.")
    seq_len: int = Field(256, ge=8, le=131_072, description="Tokens per window.")
    dataset: str = Field("builtin:wiki-vital-en", min_length=1, description="Training text (its calibration part).")
    init: str = Field("activation", description="Where the masks start: uniform (all open, the paper) or a "
                      "registered width metric (activation, taylor, magnitude): its plan's units open, the rest "
                      "closed.")
    lr: float = Field(5e-5, ge=0.0, le=1.0, description="Learning rate of the model's weights; 0 freezes them "
                      "while the masks learn.")
    mask_lr: float = Field(0.5, gt=0.0, le=10.0, description="Learning rate of the masks' log-alphas.")
    lambda_lr: float = Field(1.0, gt=0.0, le=100.0, description="Learning rate of the Lagrange multipliers.")
    num_hidden_layers: int | None = Field(None, ge=1, description="Layers kept (whole layers removed by their "
                                          "layer masks); default: every layer stays.")
    seed: int = Field(0, ge=0, description="Seed of the masks' noise and the windows each step draws.")
    checkpoint_every: int = Field(25, ge=1, description="Steps between resumable checkpoints.")

    @field_validator("init")
    @classmethod
    def _known_init(cls, value: str) -> str:
        if value != "uniform" and value not in WIDTH_METRICS:
            raise ValueError(f"init '{value}' is neither uniform nor a width metric; accepted: uniform, "
                             + ", ".join(WIDTH_METRICS.names()))
        return value


def _stretched(log_alpha: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    if noise is None:  # deterministic: the expected gate
        s = torch.sigmoid(log_alpha)
    else:
        s = torch.sigmoid((noise.log() - (1 - noise).log() + log_alpha) / BETA)
    return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)


def kept_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate > 0), the expected L0 of a hard-concrete gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LOW / HIGH))


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


@dataclass(frozen=True)
class Sizes:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    hidden: int
    vocab: int
    tied: bool


class MaskedModel(nn.Module):
    """The model under masks: forward hooks apply the gates; `objective(ids)` is LM loss + Lagrangian."""

    def __init__(self, model: nn.Module, sizes: Sizes, target: dict[str, float], warmup: int,
                 init: dict[str, torch.Tensor] | None = None):
        """`target`: per structure the shape shrinks (and "params"), its size relative to dense; only those
        structures get masks. `init`: mask name -> starting log-alphas (default: all open)."""
        super().__init__()
        self.model, self.sizes, self.warmup = model, sizes, warmup
        L = sizes.layers
        self.shapes = {"attn": (L,), "mlp": (L,), "head": (L, sizes.heads), "channel": (L, sizes.channels),
                       "hidden": (sizes.hidden,)}
        init = init or {}
        self.log_alpha = nn.ParameterDict({
            name: nn.Parameter(init[name].clone().float() if name in init else torch.full(self.shapes[name], OPEN))
            for structure in target if structure in STRUCTURES for name in STRUCTURES[structure]})
        self.target = target  # structure -> size relative to dense at the end of the ramp
        with torch.no_grad():  # the ramp starts where the masks start
            self.start = {k: float(v) for k, v in self.expected().items()}
        self.lambdas = nn.ParameterDict({k: nn.Parameter(torch.zeros(2)) for k in target})
        self.step = 0
        self.last: dict[str, float] = {}
        self._gates: dict[str, torch.Tensor] = {}
        self._hooks = self._install()

    def _install(self) -> list:
        layout, model = width_layout(self.model), self.model
        hooks = [model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out * self._gates["hidden"])]
        for position, layer in enumerate(present_layers(model)):
            o = getattr(layer.attn, layout.o)
            down = getattr(layer.mlp, layout.down)
            hooks.append(o.register_forward_pre_hook(self._heads_in(position)))
            hooks.append(o.register_forward_hook(self._half_out("attn", position)))
            hooks.append(down.register_forward_pre_hook(
                lambda _m, args, p=position: (args[0] * self._gates["channel"][p],)))
            hooks.append(down.register_forward_hook(self._half_out("mlp", position)))
        return hooks

    def _heads_in(self, position: int):
        def hook(_m, args):
            x = args[0]
            gated = x.view(*x.shape[:-1], self.sizes.heads, self.sizes.head_dim) * self._gates["head"][position, :, None]
            return (gated.view_as(x),)
        return hook

    def _half_out(self, part: str, position: int):
        return lambda _m, _args, out: out * self._gates[part][position] * self._gates["hidden"]

    def gates(self, noise: bool) -> None:
        for name, shape in self.shapes.items():
            if name not in self.log_alpha:  # a structure the shape keeps whole
                self._gates[name] = torch.ones(shape)
                continue
            log_alpha = self.log_alpha[name]
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6) if noise else None
            self._gates[name] = _stretched(log_alpha, u)

    def expected(self) -> dict[str, torch.Tensor]:
        """Expected sizes, each relative to the dense model's."""
        s = self.sizes
        p = {name: kept_probability(self.log_alpha[name]) if name in self.log_alpha else torch.ones(shape)
             for name, shape in self.shapes.items()}
        hidden = p["hidden"].sum()
        heads = (p["attn"][:, None] * p["head"]).sum()
        groups = (p["attn"] * (1 - (1 - p["head"].view(s.layers, s.kv_heads, -1)).prod(dim=2)).sum(dim=1)).sum()
        channels = (p["mlp"][:, None] * p["channel"]).sum()
        params = hidden * (2 * s.head_dim * (heads + groups) + 3 * channels + s.vocab * (1 if s.tied else 2))
        dense = s.hidden * (2 * s.head_dim * s.layers * (s.heads + s.kv_heads) + 3 * s.layers * s.channels
                            + s.vocab * (1 if s.tied else 2))
        return {"layers": (p["attn"] + p["mlp"]).sum() / (2 * s.layers), "heads": heads / (s.layers * s.heads),
                "channels": channels / (s.layers * s.channels), "hidden": hidden / s.hidden, "params": params / dense}

    def ramped(self) -> dict[str, float]:
        share = 1.0 if self.warmup == 0 else min(1.0, self.step / self.warmup)
        return {k: self.start[k] + (t - self.start[k]) * share for k, t in self.target.items()}

    def objective(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.gates(noise=True)
        loss = lm_loss(self.model, input_ids)
        sizes, targets = self.expected(), self.ramped()
        penalty = torch.zeros(())
        for name, lam in self.lambdas.items():
            gap = sizes[name] - targets[name]
            lam = _Reverse.apply(lam)  # ascent on λ, descent on everything else
            penalty = penalty + lam[0] * gap + lam[1] * gap * gap
        self.last = {"loss": loss.item(), "penalty": penalty.item(),
                     # Structures the shape keeps whole have no masks: their size stays 1.
                     **{f"expected.{k}": v.item() for k, v in sizes.items() if k in self.lambdas},
                     **{f"gap.{k}": sizes[k].item() - targets[k] for k in self.lambdas}}
        return loss + penalty

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()


class _Trace:
    """The trainer's step hook: the step counter the ramp reads, and every step's numbers (resumable)."""

    def __init__(self, masked: MaskedModel, on_unit: Callable[..., None]):
        self.masked, self.on_unit = masked, on_unit
        self.rows: list[dict] = []

    def after_step(self, done: int, model: nn.Module) -> None:
        self.masked.step = done
        self.rows.append({"step": done, **self.masked.last})

    def report(self, done: int, total: int, _loss: float) -> None:
        """The trainer's `on_step`: progress with the constraint's state, not just the loss."""
        last = self.masked.last
        self.on_unit(done, total, f"loss {last['loss']:.3f}, expected params {last['expected.params']:.3f}, "
                                  f"gap {last['gap.params']:+.3f}")

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        self.masked.step = self.rows[-1]["step"] if self.rows else 0


def _sizes(model: nn.Module) -> Sizes:
    dense = dense_widths(model)
    config = model.config
    return Sizes(len(layer_ids(model)), dense["heads"], dense["kv_heads"], dense["head_dim"], dense["channels"],
                 dense["hidden"], config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))


def _targets(sizes: Sizes, shape: WidthShape, heads: int, kv: int, layers: int) -> dict[str, float]:
    """Per structure the asked share, and the parameter share the shape has (same formula as `expected`)."""
    channels = shape.intermediate_size or sizes.channels
    hidden = shape.hidden_size or sizes.hidden
    vocab = sizes.vocab * (1 if sizes.tied else 2)
    params = hidden * (2 * sizes.head_dim * layers * (heads + kv) + 3 * layers * channels + vocab)
    dense = sizes.hidden * (2 * sizes.head_dim * sizes.layers * (sizes.heads + sizes.kv_heads)
                            + 3 * sizes.layers * sizes.channels + vocab)
    shares = {"layers": layers / sizes.layers, "heads": layers * heads / (sizes.layers * sizes.heads),
              "channels": layers * channels / (sizes.layers * sizes.channels), "hidden": hidden / sizes.hidden}
    return {**{k: v for k, v in shares.items() if v < 1.0}, "params": params / dense}


def _layers_problem(options: ShearedSettings | None, layers: int) -> str | None:
    asked = None if options is None else options.num_hidden_layers
    if asked is not None and asked > layers:
        return f"width.sheared.num_hidden_layers {asked} is above the model's {layers} layers"
    return None


@register_width_strategy("sheared", ShearedSettings, scores_units=False, whole_layers=True,
                         check=lambda options, config: _layers_problem(options, config.num_hidden_layers),
                         description="learned hard-concrete masks to the shape, with the weights (Sheared LLaMA)")
def sheared_plan(model: nn.Module, scores: UnitScores | None, shape: WidthShape, calibration: Calibration,
                 **settings) -> PlanOutcome:
    options = ShearedSettings(**settings)
    if calibration.model_path is None or calibration.state_dir is None:
        raise ValueError("sheared: the width stage passes the model's folder and a state folder")
    if any(layer.attn is None or layer.mlp is None for layer in present_layers(model)):
        raise WidthError("width.strategy sheared learns masks on whole layers: give it a model without removed "
                         "halves (search.target.blocks: 0, or score.granularity: layer)")
    dense = dense_widths(model)
    shape = resolve_shape(shape, dense)
    heads, kv = resolved_heads(shape, dense)
    sizes = _sizes(model)
    problem = _layers_problem(options, sizes.layers)
    if problem:
        raise WidthError(problem)
    layers = options.num_hidden_layers or sizes.layers
    refuse_unprunable_heads(model, heads, kv)
    init = None
    if options.init != "uniform":
        scores = WIDTH_METRICS.lookup(options.init).scores(model, calibration.windows, calibration.batch_windows)
        init = initial_logits(model, scores, shape, heads, kv)
    work = copy.deepcopy(model)
    torch.manual_seed(options.seed)
    masked = MaskedModel(work, sizes, _targets(sizes, shape, heads, kv, layers), options.warmup, init)
    trace = _Trace(masked, calibration.on_unit)
    streams = TrainingStreams(calibration.model_path, {options.dataset: 1.0}, options.seq_len,
                              options.steps * options.batch_size * options.seq_len)
    masked.requires_grad_(True)
    if options.lr == 0:  # frozen weights: only the masks and the multipliers train
        work.requires_grad_(False)
    lrs = {"log_alpha": options.mask_lr, "lambdas": options.lambda_lr}
    try:
        train(masked, lambda step: streams.batch(step, options.batch_size, options.seed),
              TrainSettings(options.steps, options.lr, 0, options.seed, options.checkpoint_every, "sheared"),
              Path(calibration.state_dir), _fingerprint(options, shape), log=lambda _m: None,
              # Without a caller following the steps, the trainer draws its own progress bar.
              on_step=None if calibration.on_unit is None else trace.report,
              loss_of=lambda m, ids: m.objective(ids), hook=trace,
              groups=lambda named: _groups(named, options.lr, lrs))
    finally:
        masked.remove_hooks()
        masked.requires_grad_(False)
    return _fold(masked, shape, heads, kv, layers, trace.rows)


def _groups(named: dict[str, nn.Parameter], lr: float, lrs: dict[str, float]) -> list[dict]:
    groups = {key: [] for key in (*lrs, "weights")}
    for name, param in named.items():
        groups[next((k for k in lrs if name.startswith(k + ".")), "weights")].append(param)
    rates = {"weights": lr, **lrs}
    return [{"params": params, "lr": rates[key]} for key, params in groups.items() if params]


def initial_logits(model: nn.Module, scores: UnitScores, shape: WidthShape, heads: int,
                   kv: int) -> dict[str, torch.Tensor]:
    """Log-alphas at a metric's choice: the units of its `uniform` plan open (+OPEN), the others closed
    (−OPEN), so the deterministic mask is that plan; layer masks are left to start open."""
    kept_shape = WidthShape(**{**shape.model_dump(), "num_attention_heads": heads, "num_key_value_heads": kv})
    plan = uniform_plan(model, scores, kept_shape)
    dense, ids = dense_widths(model), layer_ids(model)

    def logits(size: int, kept: tuple[int, ...] | None) -> torch.Tensor:
        values = torch.full((size,), OPEN if kept is None else -OPEN)
        if kept is not None:
            values[list(kept)] = OPEN
        return values

    def per_layer(field: str, size: int) -> torch.Tensor:
        return torch.stack([logits(size, getattr(plan.layers[lid], field) if lid in plan.layers else None)
                            for lid in ids])

    return {"head": per_layer("heads", dense["heads"]), "channel": per_layer("channels", dense["channels"]),
            "hidden": logits(dense["hidden"], plan.hidden)}


def _fingerprint(options: ShearedSettings, shape: WidthShape) -> str:
    return f"sheared:{options.model_dump_json()}:{shape.model_dump_json()}"


def _fold(masked: MaskedModel, shape: WidthShape, heads: int, kv: int, layers: int,
          rows: list[dict]) -> PlanOutcome:
    """Keep the top units to exactly the shape, fold their gate values into the trained weights."""
    work, sizes = masked.model, masked.sizes
    with torch.no_grad():
        masked.gates(noise=False)
        gates = {k: v.detach().clone() for k, v in masked._gates.items()}
        # A structure without masks: every unit ties, and the shape keeps them all.
        alpha = {k: masked.log_alpha[k].detach().clone() if k in masked.log_alpha else torch.full(shape_, OPEN)
                 for k, shape_ in masked.shapes.items()}
    ids = layer_ids(work)
    by_layer = sorted(range(sizes.layers), key=lambda p: (-float(alpha["attn"][p] + alpha["mlp"][p]), p))
    dropped = sorted(by_layer[layers:])
    scores = UnitScores(heads={ids[p]: alpha["head"][p] for p in range(sizes.layers)},
                        channels={ids[p]: alpha["channel"][p] for p in range(sizes.layers)}, hidden=alpha["hidden"])
    _scale(work, gates)
    blocks = tuple(f"layers.{ids[p]}" for p in dropped)
    kept_shape = WidthShape(**{**shape.model_dump(), "num_attention_heads": heads, "num_key_value_heads": kv})
    plan = uniform_plan(work, scores, kept_shape)
    plan = plan.model_copy(update={"layers": {lid: w for lid, w in plan.layers.items()
                                              if f"layers.{lid}" not in blocks}})
    pruned = apply_width(remove_blocks(work, list(blocks)), plan)
    weights = {name: p.detach().clone() for name, p in pruned.state_dict().items()}
    return PlanOutcome(plan, weights=weights, scores=scores, blocks=blocks, trace=rows)


def _scale(model: nn.Module, gates: dict[str, torch.Tensor]) -> None:
    """Fold the deterministic gates into the weights: what the masked model computed on the kept units."""
    layout = width_layout(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        # A tied head reads the same matrix, which the gate did not scale: there the embedding keeps its values.
        if head is None or head.weight is not embed.weight:
            embed.weight.mul_(gates["hidden"])
        for position, layer in enumerate(present_layers(model)):
            o, down = getattr(layer.attn, layout.o), getattr(layer.mlp, layout.down)
            head_dim = o.weight.shape[1] // gates["head"].shape[1]
            o.weight.mul_(gates["head"][position].repeat_interleave(head_dim)[None, :])
            o.weight.mul_(gates["attn"][position] * gates["hidden"][:, None])
            down.weight.mul_(gates["channel"][position][None, :])
            down.weight.mul_(gates["mlp"][position] * gates["hidden"][:, None])
