"""ONNX export of both towers checked with onnxruntime; HF-style folder; nothing half-written."""
import pytest
import torch

from vlmo_fast.attention import MultiHeadSelfAttention
from vlmo_fast.export import check_onnx, export_onnx, export_pretrained, staged_directory
from vlmo_fast.inference import Encoder
from vlmo_fast.mome import MoMEFeedForward
from vlmo_fast.model import VLMo

pytest.importorskip("onnxruntime")


def test_onnx_towers_match_pytorch(tmp_path):
    model = VLMo.from_preset("tiny", max_text_len=12)
    model.train()
    paths = export_onnx(model, tmp_path / "onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == \
        ["image_encoder.onnx", "onnx_config.json", "text_encoder.onnx"]
    assert paths["image"].is_file() and paths["text"].is_file()
    # the caller's model is left as it was: training mode, automatic backends
    assert model.training
    assert all(m.backend is None for m in model.modules()
               if isinstance(m, (MoMEFeedForward, MultiHeadSelfAttention)))
    diffs = check_onnx(model, tmp_path / "onnx", batch=3)   # another batch size than traced
    assert set(diffs) == {"image", "text"}
    assert diffs["image"] < 1e-4 and diffs["text"] < 1e-4, diffs
    with pytest.raises(FileExistsError, match="not empty"):
        export_onnx(model, tmp_path / "onnx", towers=("image",))
    with pytest.raises(ValueError, match="towers"):
        export_onnx(model, tmp_path / "x", towers=("audio",))


def test_onnx_dynamo_exporter_matches_pytorch(tmp_path):
    """torch.export-based exporter: the towers tell the FFN their expert, so nothing traced is
    read on the host; dynamic batch; same numbers as PyTorch through onnxruntime."""
    pytest.importorskip("onnxscript")
    model = VLMo.from_preset("tiny", max_text_len=12)
    export_onnx(model, tmp_path / "onnx", exporter="dynamo")
    diffs = check_onnx(model, tmp_path / "onnx", batch=3)
    assert diffs["image"] < 1e-4 and diffs["text"] < 1e-4, diffs
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, tmp_path / "x", exporter="jit")


class FailingTokenizer:
    def save(self, directory):
        (directory / "vocab.txt").write_text("[PAD]\n")
        raise OSError("disk full")


def test_pretrained_folder_roundtrip_and_atomicity(tmp_path):
    model = VLMo.from_preset("tiny")
    out = export_pretrained(model, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "manifest.json",
                                             "preprocessor_config.json"}
    enc = Encoder.from_pretrained(out, progress=False)
    c = model.config
    images = torch.rand(2, 3, c.img_size, c.img_size) * 2 - 1
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc.embed_images(images), model.encode_image(images).features)
    with pytest.raises(OSError, match="disk full"):
        export_pretrained(model, tmp_path / "hf2", tokenizer=FailingTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]   # no half-written folder, no stage
    with pytest.raises(FileExistsError):
        export_pretrained(model, tmp_path / "hf")
    export_pretrained(model, tmp_path / "hf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_staged_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(target, overwrite=True) as stage:
            (stage / "new.txt").write_text("new")
            raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with staged_directory(target, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
