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
    try:
        f = path.open("rb")
    except OSError as e:
        raise FileNotFoundError(f"cannot open checkpoint shard {path}: {e.strerror}") from None
    with f:
        size = path.stat().st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(
                f"corrupt safetensors file {path}: shorter than its 8-byte header length"
            )
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(
                f"corrupt safetensors file {path}: header of {n} bytes in a {size}-byte file"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt safetensors file {path}: unreadable header ({e})") from None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        shape = info["shape"]
        numel = 1
        for d in shape:
            numel *= d
        if dtype is None or end - begin != numel * dtype.itemsize or 8 + n + end > size:
            raise ValueError(
                f"corrupt safetensors file {path}: tensor {name!r} does not fit its header"
            )
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        out[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=8 + n + begin).view(shape)
    return out


def from_checkpoint(
    folder: str | Path, dtype: torch.dtype | None = None
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The spec and the weights of a speq checkpoint folder. Weights stay memory-mapped unless
    ``dtype`` asks for a conversion (which reads them)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: not a speq checkpoint folder")
    config = MoEConfig.load(cfg_path)
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors shard in {folder}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in wanted if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint shard(s) {missing} listed in {index} are missing")
        shards = [folder / s for s in wanted]
    params: dict[str, torch.Tensor] = {}
    for shard in shards:
        params.update(read_safetensors(shard))
    stored = next(iter(params.values())).dtype
    dtype = dtype or stored
    expected = _expected_names(config)
    missing = sorted(expected - set(params))
    if missing:
        raise ValueError(
            f"checkpoint {folder} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    params = {
        k: (v if v.dtype == dtype else v.to(dtype)) for k, v in params.items() if k in expected
    }
    return ModelSpec(config, dtype), params


def _expected_names(cfg: MoEConfig) -> set[str]:
    names = {"embed", "norm.weight"} | (set() if cfg.tie_word_embeddings else {"lm_head"})
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        names |= {f"{p}.attn_norm.weight", f"{p}.mlp_norm.weight"}
        names |= {f"{p}.attn.{w}" for w in ("wq", "wk", "wv", "wo")}
        if cfg.is_moe_layer(i):
            names |= {f"{p}.mlp.router", f"{p}.mlp.w13", f"{p}.mlp.w2"}
            if cfg.shared_expert_intermediate_size:
                names |= {f"{p}.mlp.shared.w13", f"{p}.mlp.shared.w2"}
        else:
            names |= {f"{p}.mlp.w13", f"{p}.mlp.w2"}
    return names
