"""`export_hf`: a speq model as a transformers checkpoint folder of the family that can hold it
(Mixtral: speq's own architecture), with its tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from speq.models.hf import FAMILIES
from speq.models.model import MoEForCausalLM
from speq.models.tokenizer import Tokenizer


def export_hf(model: MoEForCausalLM, tokenizer: Tokenizer | None, path: str | Path) -> Path:
    """Write ``model`` into the folder ``path`` as a ``MixtralForCausalLM`` checkpoint
    (config.json, model.safetensors with one tensor per expert projection, generation_config.json)
    and ``tokenizer`` beside it (tokenizer.json and a tokenizer_config.json for AutoTokenizer).
    `AutoModelForCausalLM.from_pretrained(path)` then loads it without speq, and `speq.load(path)`
    reads it back. A model Mixtral cannot express is a ValueError naming what it lacks."""
    from safetensors.torch import save_file

    if not isinstance(model, MoEForCausalLM):
        raise TypeError(
            f"export_hf expects a speq.models.MoEForCausalLM, got {type(model).__name__}"
        )
    family = FAMILIES["mixtral"]
    cfg = model.config
    config = family.hf_config(cfg)  # refuses what Mixtral cannot hold before anything is written
    params = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = family.hf_tensors(cfg, params)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_id if tokenizer is not None else None
    config |= {"dtype": str(model.embed.dtype).removeprefix("torch."), "bos_token_id": None}
    config |= {"eos_token_id": eos, "pad_token_id": eos}
    _write_json(folder / "config.json", config)
    generation = {"bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos}
    _write_json(folder / "generation_config.json", generation)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(tokenizer.path, folder / "tokenizer.json")
        special = "<|endoftext|>" if eos is not None else None
        _write_json(
            folder / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.max_seq_len,
                "eos_token": special,
                "pad_token": special,
                "clean_up_tokenization_spaces": False,
            },
        )
    return folder


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
