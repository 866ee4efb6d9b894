"""`python -m vlmo_fast` / vlmo-fast: encode, index, search, convert, export, errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmo_fast.checkpoint import export_reference_state_dict
from vlmo_fast.cli import main
from vlmo_fast.model import VLMo

from test_eval_runner import make_checkpoint, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def exit_status(argv) -> int:
    """main's status: its return value, or the code of the SystemExit a user error raises."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", tiny_tokenizer())


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("x.png", "y.png", "z.png"):
        Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).byte().numpy()).save(root / name)
    return root


def test_encode_index_search(ckpt, photos, tmp_path, capsys):
    common = ["--checkpoint", str(ckpt), "--no-progress", "--batch-size", "2"]
    assert main(["encode", *common, "--texts", "a red circle", "two squares", "--out",
                 str(tmp_path / "t.npy")]) == 0
    emb = np.load(tmp_path / "t.npy")
    meta = json.loads((tmp_path / "t.json").read_text())
    assert emb.shape == (2, 64) and meta["kind"] == "text" and meta["ids"] == ["a red circle", "two squares"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert main(["encode", *common, "--images", str(photos), "--out", str(tmp_path / "i.npy")]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["ids"] == ["x.png", "y.png", "z.png"]

    assert main(["index", *common, "--images", str(photos), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["search", *common, "--index", str(tmp_path / "idx"), "--image",
                 str(photos / "y.png"), "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["hits"][0]["id"] == "y.png" and len(hits[0]["hits"]) == 2
    assert main(["search", *common, "--index", str(tmp_path / "idx"), "--text", "a red circle"]) == 0
    assert "a red circle:" in capsys.readouterr().out


def test_errors_exit_2_with_one_line(ckpt, tmp_path, capsys):
    common = ["--checkpoint", str(ckpt), "--no-progress"]
    assert exit_status(["encode", *common, "--images", str(tmp_path / "nope.png"),
                        "--out", str(tmp_path / "a.npy")]) == 2
    assert "image file not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert exit_status(["index", *common, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "i")]) == 2
    assert "empty corpus" in capsys.readouterr().err
    assert exit_status(["search", *common, "--index", str(tmp_path / "empty"), "--text", "a"]) == 2
    assert "not a retrieval index" in capsys.readouterr().err
    assert exit_status(["encode", "--checkpoint", str(tmp_path), "--texts", "a",
                        "--out", str(tmp_path / "a.npy")]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", *common, "--index", "x", "--text", "a", "-k", "0"])


def test_convert_roundtrip(ckpt, tmp_path):
    model = VLMo.from_pretrained(ckpt)
    assert main(["convert", "--from", str(ckpt), "--to", str(tmp_path / "ref.pth")]) == 0
    ref = torch.load(tmp_path / "ref.pth", weights_only=True)["state_dict"]
    assert set(ref) == set(export_reference_state_dict(model))
    config = tmp_path / "arch.json"
    model.config.to_json(config)
    assert main(["convert", "--from", str(tmp_path / "ref.pth"), "--to", str(tmp_path / "ours"),
                 "--config", str(config), "--vocab", str(ckpt)]) == 0
    back = VLMo.from_pretrained(tmp_path / "ours")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, msg=k)
    assert (tmp_path / "ours" / "vocab.txt").is_file()
    assert exit_status(["convert", "--from", str(tmp_path / "ref.pth"), "--to", str(tmp_path / "x")]) == 2
    model.config.replace(dim=32).to_json(tmp_path / "other.json")
    assert exit_status(["convert", "--from", str(tmp_path / "ref.pth"), "--to", str(tmp_path / "y"),
                        "--config", str(tmp_path / "other.json")]) == 2   # shapes differ: nothing written
    assert not (tmp_path / "y").exists()


def test_export_and_module_entry_point(ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlmo_fast", "export", "--checkpoint", str(ckpt),
                           "--onnx", str(tmp_path / "onnx"), "--onnx-exporter", "dynamo"],
                          capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "max |onnxruntime - torch|" in proc.stdout
    assert (tmp_path / "onnx" / "image_encoder.onnx").is_file()
    # `export --hf` (a transformers folder) is tested in tests/test_hf.py


def test_missing_extras_are_one_line_errors(ckpt, tmp_path, monkeypatch, capsys):
    """Without transformers / faiss, --hf / --faiss stop before any work with one line naming
    the extra to install (simulated: the modules cannot be imported in this process)."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.delitem(sys.modules, "vlmo_fast.hf", raising=False)   # imported afresh: fails
    assert exit_status(["export", "--checkpoint", str(ckpt), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --hf (a transformers folder) needs transformers, which is not installed: "
                   "pip install 'vlmo_fast[hf]'")
    assert not (tmp_path / "hf").exists()
    assert exit_status(["index", "--checkpoint", str(ckpt), "--images", str(tmp_path), "--out",
                        str(tmp_path / "idx"), "--faiss", "ivf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --faiss needs faiss, which is not installed: pip install 'vlmo_fast[faiss]'"


def test_checkpoint_config_json_of_either_kind(tmp_path):
    """config.json: vlmo_fast's own (only VLMoConfig fields: anything else is refused) or a
    transformers folder's (model_type "vlmo_fast": transformers' keys are left out)."""
    from vlmo_fast.checkpoint import read_config
    from vlmo_fast.config import VLMoConfig
    config = VLMoConfig.preset("tiny", attention="per_modality", vl_expert=False)
    path = tmp_path / "config.json"
    transformers_keys = {"model_type": "vlmo_fast", "architectures": ["VLMoFastModel"], "dtype": "float32",
                         "auto_map": {"AutoModel": "modeling_vlmo.VLMoFastModel"},
                         "transformers_version": "5.0.0", "tie_word_embeddings": False}
    path.write_text(json.dumps({**config.to_dict(), **transformers_keys}))
    assert read_config(path) == config
    path.write_text(json.dumps({**config.to_dict(), "architectures": ["VLMoFastModel"]}))
    with pytest.raises(ValueError, match=r"unknown keys \['architectures'\]"):
        read_config(path)
    path.write_text(json.dumps({**config.to_dict(), **transformers_keys, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert', not a VLMo"):
        read_config(path)
    path.write_text(json.dumps({**config.to_dict(), **transformers_keys, "attention": "crossed"}))
    with pytest.raises(ValueError, match="config.json: VLMoConfig: attention must be one of"):
        read_config(path)
