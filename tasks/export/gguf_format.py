"""Format `gguf`: one `model.gguf` file that llama.cpp serves, beside the record pruneflow reads it back with.

Llama models only. Whole-layer and uniform-width plans write llama.cpp's `llama` architecture; removed
halves and per-layer widths write its `deci` architecture (Nemotron-NAS), whose per-layer arrays
`attention.head_count`, `attention.head_count_kv` and `feed_forward_length` give each layer its own
sizes, zero heads meaning no attention. Tensors keep the model's dtype (fp32, fp16 or bf16; norms fp32):
quantizing is llama.cpp's job (`llama-quantize model.gguf out.gguf Q4_K_M`). The tokenizer comes from
the folder (a byte-level BPE tokenizer.json, as GPT-2, SmolLM and Llama 3 use).

The folder also holds `config.json` (the base config and `pruneflow.format: gguf`) and the tokenizer
files, so `tasks.export.load_checkpoint` rebuilds pruneflow's model from the GGUF tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.export.common import (
    DTYPES,
    adapters_problem,
    base_values,
    empty_recorded_model,
    has_lone_halves,
    pruneflow_record,
    recorded_format,
    write_config,
)
from tasks.export.registry import ExportError, ExportFormat, read_config, register_format
from tasks.surgery import layer_ids, removed_units
from tasks.surgery.width import is_uniform, recorded_plan

GGUF_FILE = "model.gguf"
# llama.cpp's deci graph drops a layer's attention output when that layer has no FFN (it skips the rest of
# the layer, residual included), so a removed MLP is written as this many zero channels instead: they add
# exactly zero to the residual stream.
ZERO_FFN_CHANNELS = 32
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
# tokenizer.json's byte-level pre-tokenizer -> llama.cpp's name for the same splitting.
_PRE_TOKENIZERS = {json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                               "use_regex": True}, sort_keys=True): "gpt-2"}


def rotary_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Transformers rotates each head's first half against its second; llama.cpp rotates neighbouring
    pairs. Interleave the halves' rows so llama.cpp computes the same attention."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `rotary_pairs`, for reading a GGUF file back."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in _LAYER:
            return f"blk.{parts[2]}.{_LAYER[module]}.{parts[-1]}"
    return None


@register_format
class GGUFFormat(ExportFormat):
    name = "gguf"
    widths = "per_layer"
    servable = False  # llama.cpp serves it; transformers does not read the folder (pruneflow does)

    def problem(self, model: nn.Module) -> str | None:
        kept = layer_ids(model)
        if kept and f"layers.{kept[0]}.attn" in removed_units(model):
            # llama.cpp reads the head size only when layer 0 has heads, and takes the model for one without
            # attention otherwise.
            return (f"format 'gguf': the first kept layer (layers.{kept[0]}) has no attention, which llama.cpp "
                    "cannot load; keep its attention (search.protect) or use format 'remote_code'")
        return self.source_problem(model.config, None) or adapters_problem(model, self.name)

    def source_problem(self, config, tokenizer) -> str | None:
        if config.model_type != "llama":
            return f"format 'gguf' writes Llama models (llama.cpp's llama and deci architectures); this is '{config.model_type}'"
        if (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default") != "default":
            return "format 'gguf' writes the default rotary embedding only; this model scales it"
        if config.attention_bias or config.mlp_bias or config.hidden_act != "silu":
            return "format 'gguf' writes Llama models without attention or MLP biases and with SiLU"
        if tokenizer is not None:
            return tokenizer_problem(json.loads(tokenizer.backend_tokenizer.to_str()))
        return None

    def write(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        import gguf

        deci = has_lone_halves(model) or (bool(recorded_plan(model)) and not is_uniform(model))
        arch = "deci" if deci else "llama"
        writer = gguf.GGUFWriter(str(out_dir / GGUF_FILE), arch)
        _write_hparams(writer, model, deci)
        _write_tokenizer(writer, out_dir, model.config.vocab_size)
        for name, tensor in _tensors(model, deci):
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits, marked as BF16
                writer.add_tensor(name, tensor.view(torch.int16).numpy().view(np.uint16),
                                  raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(name, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        config = {**model.config.to_dict(), "pruneflow": pruneflow_record(model, self.name)}
        config.pop("auto_map", None)
        write_config(out_dir, config)

    def claims(self, config: dict) -> bool:
        return recorded_format(config) == self.name

    def load(self, path: Path, dtype: str, device: str) -> nn.Module:
        import gguf

        config = read_config(path)
        model = empty_recorded_model(config["pruneflow"], base_values(config), dtype)
        reader = gguf.GGUFReader(str(Path(path) / GGUF_FILE))
        stored = {t.name: t for t in reader.tensors}
        state = {}
        for name, param in model.state_dict().items():
            key = gguf_name(name)
            if key == "output.weight" and model.config.tie_word_embeddings:
                continue  # the embedding's own tensor, loaded under token_embd
            if key not in stored:
                raise ExportError(f"{path}/{GGUF_FILE} lacks {key} (for {name})")
            state[name] = _reordered(name, _read(stored[key]).reshape(param.shape), model, rotary_halves)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or [k for k in result.missing_keys if k != "lm_head.weight"]:
            raise ExportError(f"{path}/{GGUF_FILE}: tensors do not match the record ({result})")
        return model.to(DTYPES[dtype]).to(device).eval()


def _read(tensor) -> torch.Tensor:
    """A GGUF tensor's values (the reversed shape of its dimensions, row-major) as a torch tensor."""
    import gguf

    data = np.array(tensor.data)
    if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(data)


def _layer_sizes(model: nn.Module) -> list[tuple[int, int, int]]:
    """Per kept layer: (query heads, KV heads, MLP channels), zero heads where attention was removed."""
    gone = removed_units(model)
    sizes = []
    for position, layer_id in enumerate(layer_ids(model)):
        layer = model.model.layers[position]
        attn = f"layers.{layer_id}.attn" not in gone
        mlp = f"layers.{layer_id}.mlp" not in gone
        heads = layer.self_attn.o_proj.in_features // layer.self_attn.head_dim if attn else 0
        kv = layer.self_attn.k_proj.out_features // layer.self_attn.head_dim if attn else 0
        sizes.append((heads, kv, layer.mlp.down_proj.in_features if mlp else ZERO_FFN_CHANNELS))
    return sizes


def _write_hparams(writer, model: nn.Module, deci: bool) -> None:
    import gguf

    config = model.config
    sizes = _layer_sizes(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(f"{Path(getattr(config, '_name_or_path', '') or 'model').name} (pruned by pruneflow)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(sizes))
    if deci:
        writer.add_head_count([h for h, _, _ in sizes])
        writer.add_head_count_kv([kv for _, kv, _ in sizes])
        writer.add_feed_forward_length([ff for _, _, ff in sizes])
    else:
        writer.add_head_count(sizes[0][0])
        writer.add_head_count_kv(sizes[0][1])
        writer.add_feed_forward_length(sizes[0][2])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                  torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(file_types[next(model.parameters()).dtype])


def _pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's name for a tokenizer's (tokenizer.json's content) splitting, None where it has none here."""
    if spec["model"]["type"] != "BPE":
        return None
    return _PRE_TOKENIZERS.get(json.dumps(spec.get("pre_tokenizer"), sort_keys=True))


def tokenizer_problem(spec: dict) -> str | None:
    """Why a tokenizer (tokenizer.json's content) has no GGUF form here, or None."""
    if _pre_tokenizer(spec) is not None:
        return None
    return ("format 'gguf' writes byte-level BPE tokenizers (GPT-2's pre-tokenizer); this tokenizer is "
            f"{spec['model']['type']} with pre-tokenizer {spec.get('pre_tokenizer')}")


def _write_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    import gguf

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ExportError(f"format 'gguf' carries the tokenizer: {folder} has no tokenizer.json")
    spec = json.loads(file.read_text())
    pre = _pre_tokenizer(spec)
    if pre is None:
        raise ExportError(tokenizer_problem(spec))
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"format 'gguf': the tokenizer has ids up to {max(vocab.values())}, the model "
                          f"{vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _write_special_tokens(writer, folder, vocab)


def _write_special_tokens(writer, folder: Path, vocab: dict[str, int]) -> None:
    settings_file = folder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    setters = {"bos_token": writer.add_bos_token_id, "eos_token": writer.add_eos_token_id,
               "unk_token": writer.add_unk_token_id, "pad_token": writer.add_pad_token_id}
    for key, setter in setters.items():
        token = settings.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            setter(vocab[token])
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))


def _tensors(model: nn.Module, deci: bool):
    """(GGUF name, numpy array) of every weight, rotary rows interleaved, zero FFNs where MLPs were removed."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, value in state.items():
        key = gguf_name(name)
        if key is None:
            raise ExportError(f"format 'gguf' has no name for the weight {name}")
        value = _reordered(name, value.detach().cpu(), model, rotary_pairs)
        yield key, (value.float() if value.dim() == 1 else value).contiguous()
    if deci:
        yield from _zero_ffns(model)


def _zero_ffns(model: nn.Module):
    dtype = next(model.parameters()).dtype
    hidden = model.config.hidden_size
    gone = removed_units(model)
    for position, layer_id in enumerate(layer_ids(model)):
        if f"layers.{layer_id}.mlp" not in gone:
            continue
        for part, shape in (("ffn_gate", (ZERO_FFN_CHANNELS, hidden)), ("ffn_up", (ZERO_FFN_CHANNELS, hidden)),
                            ("ffn_down", (hidden, ZERO_FFN_CHANNELS))):
            yield f"blk.{position}.{part}.weight", torch.zeros(shape, dtype=dtype)
        yield f"blk.{position}.ffn_norm.weight", torch.ones(hidden)


def _heads_of(name: str, model: nn.Module) -> int:
    layer = model.model.layers[int(name.split(".")[2])].self_attn
    proj = layer.q_proj if ".q_proj." in name else layer.k_proj
    return proj.out_features // layer.head_dim


def _reordered(name: str, value: torch.Tensor, model: nn.Module, reorder) -> torch.Tensor:
    """`reorder` (rotary_pairs to write, rotary_halves to read) applied to query and key rows; others as they are."""
    if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
        return reorder(value, _heads_of(name, model))
    return value
