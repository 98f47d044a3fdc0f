"""A checkpoint folder (``config.json`` + safetensors shards) read lazily through memory maps.

No tensor is read when the folder is opened: each is a zero-copy view of a private, copy-on-write
memory map of its shard, so expert weights are paged in from disk only when an expert is first
copied to the device, and never held twice in host memory.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from speq.models.config import MoEConfig
from speq.models.spec import ModelSpec
from speq.models.weights import check_tensors, checkpoint_folder

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of a memory map; errors name the file."""
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint shard {path} is missing") from None
    except OSError as e:
        raise type(e)(f"cannot open checkpoint shard {path}: {e.strerror or e}") from None
    with f:
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"corrupt safetensors file {path}: the file is empty (0 bytes)")
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(
                f"corrupt safetensors file {path}: {size} bytes, shorter than its 8-byte header "
                "length"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(
                f"corrupt safetensors file {path}: header of {n} bytes in a {size}-byte file "
                "(truncated, or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt safetensors file {path}: unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(
                f"corrupt safetensors file {path}: its header is not a JSON object of tensors"
            )
        entries = {k: _entry(path, k, v) for k, v in header.items() if k != "__metadata__"}
        data = size - 8 - n
        needed = max((end for _, _, (_, end) in entries.values()), default=0)
        if needed > data:
            raise ValueError(
                f"corrupt safetensors file {path}: truncated: its header describes {needed} "
                f"bytes of tensor data, the file holds {data}"
            )
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    out = {}
    for name, (dtype, shape, (begin, end)) in entries.items():
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise ValueError(
                f"corrupt safetensors file {path}: tensor {name!r} does not fit its header "
                f"({end - begin} bytes for {numel} x {dtype})"
            )
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=8 + n + begin).view(shape)
    return out


def _entry(path: Path, name: str, info: object) -> tuple[torch.dtype, list[int], tuple[int, int]]:
    """The dtype, shape and data offsets of one header entry, or a ValueError naming it."""

    def bad(what: str) -> ValueError:
        return ValueError(f"corrupt safetensors file {path}: tensor {name!r}: {what}")

    if not isinstance(info, dict):
        raise bad("its header entry is not a JSON object")
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise bad(f"dtype {info.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of sizes >= 0")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    return dtype, shape, (offsets[0], offsets[1])


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def from_checkpoint(
    folder: str | Path, dtype: torch.dtype | None = None
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and the weights of a speq checkpoint folder. Weights stay memory-mapped unless
    ``dtype`` asks for a conversion (which reads them). Every error names the file at fault (and
    the tensor or config field)."""
    folder = checkpoint_folder(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: not a speq checkpoint folder")
    config = MoEConfig.load(cfg_path)
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = [folder / s for s in _index_shards(index)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint shard(s) {missing} listed in {index} are missing")
    if not shards:
        raise FileNotFoundError(
            f"{folder / 'model.safetensors'} is missing: no *.safetensors shard in {folder}"
        )
    params: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for shard in shards:
        for name, t in read_safetensors(shard).items():
            params[name], where[name] = t, shard
    files = str(shards[0]) if len(shards) == 1 else f"the shards of {folder}"
    expected = _expected_shapes(config)
    check_tensors(expected, params, where.__getitem__, files, cfg_path)
    dtype = dtype or next(iter(params.values())).dtype
    params = {
        k: (v if v.dtype == dtype else v.to(dtype)) for k, v in params.items() if k in expected
    }
    return ModelSpec(config, dtype), params


def _index_shards(index: Path) -> list[str]:
    """The shard files ``model.safetensors.index.json`` lists, or a ValueError naming it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{index} is not a safetensors index (a JSON object with a weight_map): {e}"
        ) from None
    if not all(isinstance(s, str) for s in shards):
        raise ValueError(f"{index}: weight_map values must be shard file names")
    return shards


def _expected_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every weight `speq.models.MoEForCausalLM` has for ``cfg``, with its shape."""
    h, d, v = cfg.hidden_size, cfg.head_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (v, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        shapes |= {f"{p}.attn_norm.weight": (h,), f"{p}.mlp_norm.weight": (h,)}
        shapes |= {
            f"{p}.attn.wq": (cfg.num_heads * d, h),
            f"{p}.attn.wk": (cfg.num_kv_heads * d, h),
            f"{p}.attn.wv": (cfg.num_kv_heads * d, h),
            f"{p}.attn.wo": (h, cfg.num_heads * d),
        }
        if cfg.is_moe_layer(i):
            e, n = cfg.num_experts, cfg.expert_intermediate_size
            shapes |= {
                f"{p}.mlp.router": (e, h),
                f"{p}.mlp.w13": (e, 2 * n, h),
                f"{p}.mlp.w2": (e, h, n),
            }
            if si := cfg.shared_expert_intermediate_size:
                shapes |= {f"{p}.mlp.shared.w13": (2 * si, h), f"{p}.mlp.shared.w2": (h, si)}
        else:
            di = cfg.dense_intermediate_size
            shapes |= {f"{p}.mlp.w13": (2 * di, h), f"{p}.mlp.w2": (h, di)}
    return shapes
