"""Format `nemotron_nas`: NVIDIA's Nemotron-NAS / DeciLM layout, which vLLM serves as `DeciLMForCausalLM`.

Files: `model.safetensors` (Llama parameter names, nothing for no-op blocks), `config.json`
(model_type `nemotron-nas`, one `block_configs` entry per layer, `auto_map`, and pruneflow's record of
the original block ids), `configuration_decilm.py` (the config class vLLM and transformers load with
trust_remote_code) and `modeling_decilm.py` (transformers model classes, for `from_pretrained`).

Per layer: `attention.no_op` / `ffn.no_op` mark removed blocks; a kept attention gives `n_heads_in_group`
(query heads per KV head); a kept FFN gives `ffn_mult` when DeciLM's size rule reproduces the
intermediate size exactly (what vLLM and llama.cpp read), else an explicit `intermediate_size` (recent
vLLM only).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from torch import nn

from tasks.export.codegen import render, write_code
from tasks.export.common import (
    adapters_problem,
    KeptLayer,
    base_values,
    kept_layers,
    load_as_pruned,
    load_width_pruned,
    pruneflow_record,
    write_config,
    write_weights,
)
from tasks.export.registry import ExportError, ExportFormat, read_config, register_format
from tasks.export.templates.configuration_decilm import ffn_mult_to_intermediate_size
from tasks.surgery.width import layer_shapes, recorded_plan

MODEL_TYPE = "nemotron-nas"
ARCHITECTURE = "DeciLMForCausalLM"
CONFIG_FILE = "configuration_decilm.py"
MODELING_FILE = "modeling_decilm.py"
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig", "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
# The generic template, renamed to DeciLM's class and file names.
_RENAMES = [("configuration_pruned", "configuration_decilm"), ("PrunedLlamaConfig", "DeciLMConfig"),
            ("PrunedLlama", "DeciLM")]


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float | None:
    """The ffn_mult that DeciLM's rule maps back to exactly this size, if there is one."""
    mult = intermediate_size * 3 / (2 * hidden_size)
    return mult if ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size else None


def block_config(layer: KeptLayer, num_heads: int, num_kv_heads: int, intermediate: int, hidden: int) -> dict:
    attention = {"no_op": not layer.attention, "replace_with_linear": False,
                 "n_heads_in_group": num_heads // num_kv_heads if layer.attention else None}
    ffn: dict = {"no_op": not layer.mlp, "replace_with_linear": False}
    if not layer.mlp:
        ffn["ffn_mult"] = None  # llama.cpp reads the key on every block; None marks a dummy FFN
    elif (mult := ffn_mult_for(intermediate, hidden)) is not None:
        ffn["ffn_mult"] = mult
    else:
        ffn["intermediate_size"] = intermediate  # vLLM tells the two apart by which key exists
    return {"attention": attention, "ffn": ffn}


@register_format
class NemotronNasFormat(ExportFormat):
    name = "nemotron_nas"
    streams = True
    carries_code = True
    widths = "per_layer"  # per block: ffn_mult and n_heads_in_group (query heads fixed; _plan_problem)

    def problem(self, model: nn.Module) -> str | None:
        config = model.config
        if adapters_problem(model, self.name):
            return adapters_problem(model, self.name)
        if config.model_type != "llama":
            return (
                f"format 'nemotron_nas' is the Llama-based DeciLM layout; model_type '{config.model_type}' "
                "needs format 'remote_code'"
            )
        if _layer_widths(model) and (problem := _plan_problem(model)):
            return problem
        first = kept_layers(model)[0]
        if not first.attention:
            # vLLM's DeciLM layer starts the residual stream in the first attention's norm; with that
            # attention a no-op, its FFN norm receives no residual and the layer fails.
            return (
                f"format 'nemotron_nas': the first kept layer (layers.{first.layer_id}) has no attention, "
                "which vLLM's DeciLM runner cannot start from; use format 'remote_code'"
            )
        return None

    def width_target_problem(self, shape: dict[str, int], strategy: str, dense: dict[str, int]) -> str | None:
        if not shape:
            return ("prune.format 'nemotron_nas' needs width.shape (an intermediate_size that is a multiple of 256), "
                    "not width.params_ratio, whose shapes may drop heads")
        if shape.get("hidden_size"):
            return ("prune.format 'nemotron_nas' keeps the hidden size (vLLM derives each head's size from it): "
                    "leave width.shape.hidden_size out, or use prune.format auto")
        heads = shape.get("num_attention_heads") or (shape.get("num_key_value_heads") or dense["kv_heads"]) * (
            dense["heads"] // dense["kv_heads"])
        if heads != dense["heads"]:
            return (f"prune.format 'nemotron_nas' keeps all {dense['heads']} query heads in every block; the width "
                    f"shape leaves {heads}: prune only MLP channels, or use prune.format auto")
        size = shape.get("intermediate_size")
        if strategy != "uniform" or (size is not None and size % 256):
            return (f"prune.format 'nemotron_nas' gives FFN widths by ffn_mult, multiples of 256 only: use "
                    f"width.strategy uniform with width.shape.intermediate_size a multiple of 256 (not {size}), "
                    "or prune.format auto")
        return None

    def write(self, model: nn.Module, out_dir: Path) -> None:
        config = write_weights(model, out_dir)
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        widths = _layer_widths(model)
        blocks = [block_config(layer, heads, widths.get(layer.layer_id, {}).get("kv_heads") or kv_heads,
                               widths.get(layer.layer_id, {}).get("channels") or config["intermediate_size"],
                               config["hidden_size"])
                  for layer in kept_layers(model)]
        config.update(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], auto_map=dict(AUTO_MAP),
                      block_configs=blocks, pruneflow=pruneflow_record(model, self.name))
        config.update(_legacy_rope(config))
        write_config(out_dir, config)
        write_code(out_dir, self.code_files(config))

    def code_files(self, config: dict) -> dict[str, str]:
        return {CONFIG_FILE: render(CONFIG_FILE, []), MODELING_FILE: render("modeling_pruned.py", _RENAMES)}

    def claims(self, config: dict) -> bool:
        return config.get("model_type") == MODEL_TYPE

    def load(self, path: Path, dtype: str, device: str) -> nn.Module:
        problems = check_nemotron_nas(path)
        if problems:
            raise ExportError(f"{path} breaks the nemotron-nas rules: " + "; ".join(problems))
        config = read_config(path)
        blocks = config["block_configs"]
        record = config.get("pruneflow") or {}
        # A checkpoint pruneflow did not write has no record: its layers are then the original ones.
        ids = record.get("layer_ids", list(range(len(blocks))))
        removed = record.get("removed", [
            f"layers.{lid}.{part}" for lid, block in zip(ids, blocks)
            for part, section in (("attn", "attention"), ("mlp", "ffn")) if block[section]["no_op"]
        ])
        values = base_values(config)
        if record.get("plan"):
            return load_width_pruned(Path(path), {**record, "base_model_type": "llama"}, values, dtype, device)
        values["num_key_value_heads"], values["intermediate_size"] = _uniform_sizes(config)
        return load_as_pruned(Path(path), "llama", values, ids, removed, dtype, device)


def _layer_widths(model: nn.Module) -> dict[int, dict[str, int]]:
    """Per kept layer, its widths when a plan narrowed them (else nothing: the config's sizes hold)."""
    return layer_shapes(model) if recorded_plan(model) else {}


def _plan_problem(model: nn.Module) -> str | None:
    """DeciLM blocks have one query head count (vLLM derives head_dim from it) and an FFN width that
    vLLM and llama.cpp both read from ffn_mult, which reaches multiples of 256 only."""
    dense = model.config.pruneflow["dense"]
    if recorded_plan(model).get("hidden"):
        return ("format 'nemotron_nas' keeps the hidden size (vLLM derives each head's size from it), but the plan "
                "prunes hidden channels; use format 'remote_code' or 'hf'")
    shapes = _layer_widths(model)
    heads = sorted({s["heads"] for s in shapes.values() if s["heads"]} - {dense["num_attention_heads"]})
    if heads:
        return (f"format 'nemotron_nas' keeps every layer's {dense['num_attention_heads']} query heads (one "
                f"num_attention_heads for all blocks), but the plan leaves {heads}; prune heads with format "
                "'remote_code' or 'hf', or only MLP channels here")
    odd = {lid: s["channels"] for lid, s in shapes.items() if s["channels"] and s["channels"] % 256}
    if odd:
        return (f"format 'nemotron_nas' gives each block's FFN width by ffn_mult, which vLLM and llama.cpp round "
                f"up to a multiple of 256; the plan keeps {odd} channels (layer: width); keep multiples of 256 "
                "(width.shape.intermediate_size) or use format 'remote_code'")
    return None


def _legacy_rope(config: dict) -> dict:
    # Readers that predate transformers' `rope_parameters` (vLLM on transformers 4, llama.cpp's converter)
    # look for `rope_theta` and `rope_scaling` at the top level.
    rope = config.get("rope_parameters") or {}
    legacy = {"rope_theta": rope["rope_theta"]} if "rope_theta" in rope else {}
    if rope.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return legacy


def _intermediate(ffn: dict, hidden: int) -> int | None:
    if ffn.get("ffn_mult") is not None:
        return ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden)
    return ffn.get("intermediate_size")


def _uniform_sizes(config: dict) -> tuple[int, int]:
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv = {heads // b["attention"]["n_heads_in_group"] for b in config["block_configs"] if not b["attention"]["no_op"]}
    ffn = {_intermediate(b["ffn"], hidden) for b in config["block_configs"] if not b["ffn"]["no_op"]}
    if len(kv) > 1 or len(ffn) > 1:
        raise ExportError("pruneflow reads nemotron-nas checkpoints whose kept blocks all have the same sizes")
    return (kv.pop() if kv else config.get("num_key_value_heads") or heads,
            ffn.pop() if ffn else config.get("intermediate_size") or 4 * hidden)


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_nemotron_nas(path: Path) -> list[str]:
    """Every way the checkpoint breaks the format's rules (empty when it follows them).

    Rules: the identifiers vLLM dispatches on; one block entry per layer; a kept attention has an
    integer `n_heads_in_group` dividing the heads, a kept FFN exactly one of `ffn_mult` /
    `intermediate_size`; no tensor under a no-op block and every tensor of a kept one, with the sizes
    the entry implies; a config class reachable through `auto_map` (transformers has none built in)."""
    config = json.loads((Path(path) / "config.json").read_text())
    problems = []
    if config.get("model_type") != MODEL_TYPE:
        problems.append(f"model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    if config.get("architectures") != [ARCHITECTURE]:
        problems.append(f"architectures is {config.get('architectures')!r}, not [{ARCHITECTURE!r}]")
    config_class = (config.get("auto_map") or {}).get("AutoConfig", "")
    if not (Path(path) / f"{config_class.split('.')[0]}.py").is_file():
        problems.append(f"auto_map.AutoConfig {config_class!r} names no file in the checkpoint")
    blocks = config.get("block_configs") or []
    layers = config.get("num_hidden_layers")
    if len(blocks) != layers:
        problems.append(f"{len(blocks)} block_configs entries for num_hidden_layers {layers}")
    shapes = weight_shapes(path)
    for i, block in enumerate(blocks):
        problems += _check_block(i, block, config, shapes)
    expected = {f"model.layers.{i}." for i in range(len(blocks))}
    strays = [n for n in shapes if n.startswith("model.layers.") and ".".join(n.split(".")[:3]) + "." not in expected]
    if strays:
        problems.append(f"tensors of layers beyond num_hidden_layers: {strays[:3]}")
    return problems


def _check_block(i: int, block: dict, config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    attention, ffn = block.get("attention", {}), block.get("ffn", {})
    problems = []
    expected: dict[str, tuple[int, ...]] = {}
    if not isinstance(attention.get("no_op"), bool) or not isinstance(ffn.get("no_op"), bool):
        return [f"layer {i}: attention.no_op and ffn.no_op must be booleans"]
    if not attention["no_op"]:
        group = attention.get("n_heads_in_group")
        if not isinstance(group, int) or group < 1 or heads % group:
            problems.append(f"layer {i}: n_heads_in_group {group!r} does not divide {heads} heads")
        else:
            kv = heads // group
            out = {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim, "o_proj": hidden}
            inp = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": heads * head_dim}
            expected[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
            for proj in out:
                expected[f"model.layers.{i}.self_attn.{proj}.weight"] = (out[proj], inp[proj])
                if config.get("attention_bias"):
                    expected[f"model.layers.{i}.self_attn.{proj}.bias"] = (out[proj],)
    if not ffn["no_op"]:
        if ("ffn_mult" in ffn) == ("intermediate_size" in ffn):
            problems.append(f"layer {i}: a kept FFN gives exactly one of ffn_mult and intermediate_size")
        else:
            size = _intermediate(ffn, hidden)
            out = {"gate_proj": size, "up_proj": size, "down_proj": hidden}
            expected[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
            for proj in out:
                expected[f"model.layers.{i}.mlp.{proj}.weight"] = (out[proj], hidden if proj != "down_proj" else size)
                if config.get("mlp_bias"):
                    expected[f"model.layers.{i}.mlp.{proj}.bias"] = (out[proj],)
    present = {n: s for n, s in shapes.items() if n.startswith(f"model.layers.{i}.")}
    for name, shape in expected.items():
        if name not in present:
            problems.append(f"layer {i}: missing {name}")
        elif present[name] != shape:
            problems.append(f"layer {i}: {name} has shape {present[name]}, the block entry implies {shape}")
    extra = sorted(set(present) - set(expected))
    if extra:
        problems.append(f"layer {i}: tensors the block entry does not allow (no-op blocks have none): {extra[:3]}")
    return problems
