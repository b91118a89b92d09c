"""Where a model's weights live while it runs: all resident, or streamed piece by piece under a budget.

A streamed model is a skeleton whose parameters sit on the meta device. Its pieces are the input
embedding (with the other small tensors outside the decoder layers, such as the final norm), each decoder
layer, and an untied output head. `hold(pieces)` brings pieces onto the device from the checkpoint's
shards for as long as a caller uses them; pieces nobody holds stay resident until the budget needs their
room (layers first, least recently used first), so a pass over the layers reads each layer once.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from tasks.stream.shards import ShardIndex

EMBED = "embed"
HEAD = "head"


def layer_piece(position: int) -> str:
    return f"layer:{position}"


@dataclass
class Piece:
    """One piece's tensors: checkpoint name -> every (module, attribute) that holds it (tied weights: several)."""

    name: str
    label: str  # the module path a user recognises, for messages
    places: dict[str, list[tuple[nn.Module, str]]] = field(default_factory=dict)
    nbytes: int = 0


def pieces_of(model: nn.Module, layers: nn.ModuleList) -> dict[str, Piece]:
    """The model's pieces, in the order a forward pass needs them."""
    layer_paths = {id(layer): position for position, layer in enumerate(layers)}
    prefixes = {name: layer_paths[id(module)] for name, module in model.named_modules() if id(module) in layer_paths}
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    embed_params = {id(p) for p in model.get_input_embeddings().parameters()}
    pieces: dict[str, Piece] = {EMBED: Piece(EMBED, _embed_label(model))}
    pieces.update({layer_piece(p): Piece(layer_piece(p), f"{path} (decoder layer {p})")
                   for path, p in sorted(prefixes.items(), key=lambda item: item[1])})
    pieces[HEAD] = Piece(HEAD, "the output head")
    names = {id(p): name for name, p in model.named_parameters()}  # first path of a tied parameter
    for path, param in model.named_parameters(remove_duplicate=False):
        module_path, _, attr = path.rpartition(".")
        piece = _piece_of(path, prefixes, id(param) in head_params and id(param) not in embed_params)
        places = pieces[piece].places.setdefault(names[id(param)], [])
        if not places:
            pieces[piece].nbytes += param.numel() * param.element_size()
        places.append((model.get_submodule(module_path), attr))
    return {name: piece for name, piece in pieces.items() if piece.places}


def _piece_of(path: str, prefixes: dict[str, int], in_head: bool) -> str:
    for prefix, position in prefixes.items():
        if path.startswith(prefix + "."):
            return layer_piece(position)
    return HEAD if in_head else EMBED


def _embed_label(model: nn.Module) -> str:
    path = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
    return f"{path} (the input embedding, with the final norm)"


class StreamedWeights:
    """Brings pieces of a skeleton model onto `device` from `index` while they are held, within `budget_bytes`.

    Held pieces are never evicted: threads that hold different layers at once may exceed the budget by
    the pieces they hold (the search runs one candidate at a time when it streams, so none do)."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, index: ShardIndex, device: str, budget_bytes: int):
        self.index = index
        self.device = torch.device(device)
        self.budget_bytes = budget_bytes
        self.pieces = pieces_of(model, layers)
        # Pieces follow their layer modules, so a layer list edited after loading (blocks removed) still
        # finds each layer's piece.
        self._layer_pieces = {id(layer): layer_piece(p) for p, layer in enumerate(layers)}
        self._dtypes = {name: places[0][0]._parameters[places[0][1]].dtype
                        for piece in self.pieces.values() for name, places in piece.places.items()}
        self._resident: OrderedDict[str, None] = OrderedDict()
        self._held: Counter[str] = Counter()
        self._lock = threading.RLock()
        self.loads = 0  # pieces brought in, over the model's life
        self.peak_bytes = 0

    def layer_piece_of(self, layer: nn.Module) -> str:
        return self._layer_pieces[id(layer)]

    @property
    def resident_bytes(self) -> int:
        return sum(self.pieces[p].nbytes for p in self._resident)

    @contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        names = tuple(n for n in names if n in self.pieces)
        with self._lock:
            for name in names:
                self._held[name] += 1
                self._bring(name)
        try:
            yield
        finally:
            with self._lock:
                for name in names:
                    self._held[name] -= 1

    def _bring(self, name: str) -> None:
        if name in self._resident:
            self._resident.move_to_end(name)
            return
        need = self.pieces[name].nbytes
        for other in sorted(self._resident, key=_eviction_order):
            if self.resident_bytes + need <= self.budget_bytes:
                break
            if not self._held[other]:
                self._set(other, resident=False)
        self._set(name, resident=True)
        self.loads += 1
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)

    def _set(self, name: str, resident: bool) -> None:
        places_of = self.pieces[name].places
        read = self.index.read({n: self._dtypes[n] for n in places_of}, self.device) if resident else {}
        for tensor_name, places in places_of.items():
            module, attr = places[0]
            old = module._parameters[attr]
            data = read[tensor_name] if resident else torch.empty(old.shape, dtype=old.dtype, device="meta")
            param = nn.Parameter(data, requires_grad=False)
            for module, attr in places:
                module._parameters[attr] = param
        if resident:
            self._resident[name] = None
        else:
            del self._resident[name]


def _eviction_order(name: str) -> int:
    """Layers go first (least recently used first: `sorted` keeps that order), then the head, the embedding
    last: every pass needs it at both ends (the final norm, and a tied head, are in it), so it stays
    whenever the budget has room for it beside a layer, and a pass then reads each layer once."""
    return {HEAD: 1, EMBED: 2}.get(name, 0)


_STREAM = "_pruneflow_stream"


def attach(model: nn.Module, weights: StreamedWeights) -> None:
    model.__dict__[_STREAM] = weights


def streamed(model: nn.Module) -> StreamedWeights | None:
    """The model's streamed weights, or None when every weight is resident."""
    return model.__dict__.get(_STREAM)


def hold(model: nn.Module, *names: str):
    """A context in which the named pieces of `model` are on its device (nothing to do when all are)."""
    weights = streamed(model)
    return nullcontext() if weights is None else weights.hold(*names)


def hold_layer(model: nn.Module, layer: nn.Module):
    """A context in which the decoder layer `layer` of `model` is on its device."""
    weights = streamed(model)
    return nullcontext() if weights is None else weights.hold(weights.layer_piece_of(layer))
