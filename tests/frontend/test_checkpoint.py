import json

import pytest
import torch

import speq
from helpers import tiny_model
from speq.frontend import from_checkpoint


@pytest.fixture
def folder(tmp_path):
    model = tiny_model(torch.float32, shared_expert_intermediate_size=8)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_checkpoint_weights_are_memory_mapped_views(folder):
    path, model = folder
    spec, params = from_checkpoint(path)
    assert spec.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(params[name], t), name
    # every tensor is a view into one mapping of the file: addresses keep the file's offsets
    header_len = int.from_bytes((path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((path / "model.safetensors").read_bytes()[8 : 8 + header_len])
    base = params["embed"].data_ptr() - header["embed"]["data_offsets"][0]
    for name, t in params.items():
        assert t.data_ptr() - base == header[name]["data_offsets"][0], name


def test_compile_from_a_folder_equals_compile_from_the_model(folder):
    path, model = folder
    ids = torch.tensor([[3, 1, 4]])
    opts = speq.CompileOptions(policy="ondemand", backend="sim")
    assert torch.equal(
        speq.compile(str(path), opts).generate(ids, 8), speq.compile(model).generate(ids, 8)
    )


def test_missing_and_corrupt_files_are_named(folder):
    path, _ = folder
    shard = path / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"corrupt safetensors file .*model\.safetensors"):
        from_checkpoint(path)
    shard.write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="corrupt safetensors file"):
        from_checkpoint(path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors shard"):
        from_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        speq.compile(str(path))
