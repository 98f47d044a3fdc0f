"""Hugging Face checkpoint folders: the shipped demo model exported as a transformers Mixtral
(transformers decodes what speq decodes; speq.load reads it back with the same metrics); every
fault of a folder named with its file and tensor; and a folder is data: its pickle files and
remote code never run."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import speq
from speq.cli import main
from speq.models import demo_model, export_hf

TEXT = "God is really only another artist.  He invented the giraffe,"


@pytest.fixture(scope="module")
def demo():
    return demo_model(dtype=torch.float64)


@pytest.fixture(scope="module")
def exported(demo, tmp_path_factory):
    return export_hf(*demo, tmp_path_factory.mktemp("demo_hf"))


def test_transformers_decodes_the_exported_demo_model_as_speq_does(demo, exported):
    model, tok = demo
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float64).eval()
    hf.set_experts_implementation("eager")
    assert type(hf).__name__ == "MixtralForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([tok.encode(TEXT)])
    assert hf_tok(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert torch.equal(theirs, speq.compile(model).generate(ids, 24))


def test_speq_load_reads_the_export_back_with_the_same_metrics(demo, exported):
    """On the sim backend (a virtual clock: deterministic) every metric of a run from the exported
    folder equals that of a run from speq's own model."""
    model, tok = demo
    ids = torch.tensor([tok.encode(TEXT)])
    opts = speq.CompileOptions(policy="speq", k=4, backend="sim", device_memory="22MB")
    ours, theirs = speq.compile(model, opts), speq.load(exported, opts)
    assert torch.equal(ours.generate(ids, 16), theirs.generate(ids, 16))
    for key in ("tpot_ms", "hit_rate", "acceptance_rate", "bytes_moved", "elb_recall"):
        assert ours.metrics[key] == theirs.metrics[key], key


def test_speq_export_writes_a_folder_speq_load_reads(tmp_path, capsys):
    assert main(["export", "--random", "--hf", str(tmp_path / "out")]) == 0
    assert "MixtralForCausalLM" in capsys.readouterr().out
    cm = speq.load(tmp_path / "out")
    assert cm.config.num_experts == 8


# ----------------------------------------------------------------- faults, named
def _shard(folder):
    return folder / "model.safetensors"


def _rewrite(folder, edit):
    tensors = {k: v.clone() for k, v in load_file(str(_shard(folder))).items()}
    edit(tensors)
    save_file(tensors, str(_shard(folder)))


@pytest.fixture
def folder(exported, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    for f in exported.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
FAULTS = {
    "tensor-missing": (
        lambda f: _rewrite(f, lambda t: t.pop(EXPERT)),
        rf"model\.safetensors lacks tensor '{EXPERT}'",
    ),
    "tensor-wrong-shape": (
        lambda f: _rewrite(f, lambda t: t.__setitem__(EXPERT, torch.zeros(3, 3))),
        rf"model\.safetensors: tensor '{EXPERT}' has shape \[3, 3\], expected \[192, 384\]",
    ),
    "corrupt-header": (
        lambda f: _shard(f).write_bytes(_shard(f).read_bytes()[:8] + b"\xff" * 64),
        r"corrupt safetensors file \S*model\.safetensors",
    ),
    "truncated": (
        lambda f: _shard(f).write_bytes(_shard(f).read_bytes()[:-1000]),
        r"corrupt safetensors file \S*model\.safetensors",
    ),
    "shard-missing": (
        lambda f: (f / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {EXPERT: "model-00002-of-00002.safetensors"}})
        ),
        r"shard\(s\) \['model-00002-of-00002\.safetensors'\] listed in \S*index\.json are missing",
    ),
    "config-unknown-field-type": (
        lambda f: _edit_config(f, num_local_experts="eight"),
        r"config\.json: num_local_experts = 'eight' has the wrong type: expected int",
    ),
}


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | changes))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_folder_fault_names_the_file_and_the_tensor(folder, fault):
    damage, message = FAULTS[fault]
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        speq.load(folder)


# ----------------------------------------------------------------- data, never code
class _Planted:
    """Unpickling this writes a marker file: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(folder, marker):
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def test_pickle_files_and_remote_code_never_run(folder, tmp_path):
    marker = tmp_path / "ran"
    _plant(folder, marker)
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the plant works ...
    assert marker.exists()
    marker.unlink()
    speq.load(folder).generate(torch.tensor([[1, 2, 3]]), 2)  # ... and speq never runs it
    assert not marker.exists()


def test_a_folder_of_only_pickle_weights_is_refused_with_how_to_convert(folder, tmp_path):
    marker = tmp_path / "ran"
    _plant(folder, marker)
    _shard(folder).unlink()
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\).*save_pre"):
        speq.load(folder)
    assert not marker.exists()


def test_speq_runs_without_transformers(exported):
    """transformers is an optional extra: with it unimportable, speq imports, compiles its own
    model and loads a Hugging Face folder (reading a folder needs only safetensors)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, speq\n"
        "from speq.models.demo import random_demo_model\n"
        "ids = torch.tensor([[1, 2, 3]])\n"
        "speq.compile(random_demo_model()).generate(ids, 2)\n"
        f"speq.load({str(exported)!r}).generate(ids, 2)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_cli_and_the_benchmarks_take_a_transformers_folder(demo, exported, capsys):
    from speq.models import MoEForCausalLM

    model, _ = demo
    again = MoEForCausalLM.from_pretrained(exported, torch.float64)  # benchmarks, `speq demo`
    assert all(
        torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values())
    )
    argv = ["generate", "--model", str(exported), "--prompt", TEXT, "--max-new-tokens", "4"]
    assert main([*argv, "--policy", "ondemand", "--budget", "0.5"]) == 0
    assert "hit rate" in capsys.readouterr().out
