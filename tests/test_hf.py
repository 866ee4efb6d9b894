"""transformers integration: AutoConfig/AutoModel registration on import, export folders that
load with and without vlmo_fast (trust_remote_code), outputs equal to VLMo's, AutoTokenizer
and AutoImageProcessor on our files, save/from_pretrained round trips."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer  # noqa: E402

from vlmo_fast import VLMo, VLMoConfig  # noqa: E402
from vlmo_fast.data import build_tokenizer  # noqa: E402
from vlmo_fast.hf import (REMOTE_CODE_FILES, VLMoFastConfig, VLMoFastModel, export_hf,  # noqa: E402
                          hf_config_from_vlmo, vlmo_config_from_hf)
from vlmo_fast.hf.configuration_vlmo import VLMO_DEFAULTS  # noqa: E402
from vlmo_fast.io import CorruptFileError, verify_manifest  # noqa: E402

CONFIGS = {
    "relative": dict(),
    "absolute": dict(relative_position=False, layer_scale_init=None, num_classes=3, vl_layers=1),
    "ablations": dict(vl_expert=False, attention="per_modality"),   # the paper's Tables 5 and 7
}


def make_model(kind: str, **backends) -> VLMo:
    torch.manual_seed(0)
    model = VLMo.from_preset("tiny", drop_path_rate=0.0, vocab_size=300, **CONFIGS[kind], **backends)
    with torch.no_grad():   # every parameter away from its init value, so that each one matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_inputs(config: VLMoConfig, batch: int = 3):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, config.img_size, config.img_size, generator=g) * 2 - 1
    ids = torch.randint(5, config.vocab_size, (batch, config.max_text_len), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return images, ids * mask, mask


def reference_outputs(model: VLMo, images, ids, mask) -> dict:
    with torch.no_grad():
        image = model.encode_image(images, return_vl=True)
        text = model.encode_text(ids, mask, return_vl=True)
        pair = model.encode_pair(ids, images, mask)
        return {"image_embeds": image.features, "image_vl_embeds": image.vl_features,
                "image_hidden": image.hidden, "text_embeds": text.features,
                "text_vl_embeds": text.vl_features, "text_hidden": text.hidden,
                "pair_hidden": pair.hidden, "pooler_output": pair.pooled, "itm_logits": model.itm_logits(pair)}


# runs in a process that cannot import vlmo_fast (as on a machine without it)
REMOTE_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys
    class NoVlmoFast(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "vlmo_fast":
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None
    sys.meta_path.insert(0, NoVlmoFast())
    import torch
    from transformers import AutoModel
    def run(folder, inputs, out):
        images, ids, mask = torch.load(inputs)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            image = model(pixel_values=images, return_vl=True)
            text = model(input_ids=ids, attention_mask=mask, return_vl=True)
            pair = model(pixel_values=images, input_ids=ids, attention_mask=mask)
            result = {"image_embeds": image.image_embeds, "image_vl_embeds": image.image_vl_embeds,
                      "image_hidden": image.last_hidden_state, "text_embeds": text.text_embeds,
                      "text_vl_embeds": text.text_vl_embeds, "text_hidden": text.last_hidden_state,
                      "pair_hidden": pair.last_hidden_state, "pooler_output": pair.pooler_output,
                      "itm_logits": pair.itm_logits,
                      "features": model.get_image_features(images)}
        torch.save(result, out)
    for start in range(1, len(sys.argv), 3):
        run(*sys.argv[start:start + 3])
    try:
        import vlmo_fast  # noqa: F401
        raise SystemExit("vlmo_fast was importable: the test would not show anything")
    except ModuleNotFoundError:
        pass
    assert not [m for m in sys.modules if m.startswith("vlmo_fast")]
""")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("embedded", vocab_size=300, num_documents=200)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("hf")
    for kind in CONFIGS:
        export_hf(make_model(kind), root / kind, tokenizer)
    return root


def test_config_fields_are_vlmo_configs():
    assert VLMO_DEFAULTS == {f.name: f.default for f in dataclasses.fields(VLMoConfig)}
    config = VLMoConfig.preset("tiny", relative_position=False, layer_scale_init=None)
    hf = hf_config_from_vlmo(config)
    assert vlmo_config_from_hf(hf) == config
    assert (hf.hidden_size, hf.num_attention_heads, hf.num_hidden_layers) == (64, 4, 4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VLMoFastConfig(dim=65)
    with pytest.raises(TypeError, match="VLMoFastConfig"):
        vlmo_config_from_hf(transformers.BertConfig())


def test_importing_vlmo_fast_registers_without_importing_transformers():
    code = textwrap.dedent("""
        import sys, vlmo_fast
        assert "transformers" not in sys.modules and "timm" not in sys.modules
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.for_model("vlmo_fast", dim=32, num_heads=2, depth=2, vl_layers=1)
        print(type(config).__name__, type(AutoModel.from_config(config)).__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["VLMoFastConfig", "vlmo_fast.hf"]


def test_register_on_import_hook(tmp_path, monkeypatch):
    """The hook vlmo_fast installs for transformers and timm, on stand-in modules: the
    registering module runs right after the library's import (or at once when the library
    is already imported), never before, and a failing registration only warns."""
    import vlmo_fast
    for name, body in (("fakelib", "VALUE = 41\n"), ("fakelib_done", "VALUE = 1\n"),
                       ("fakelib_bad", "VALUE = 2\n"),
                       ("fakehook", "import fakelib\nfakelib.VALUE += 1\n"),
                       ("fakehook_done", "import fakelib_done\nfakelib_done.VALUE += 1\n"),
                       ("fakehook_bad", "raise RuntimeError('incompatible version')\n")):
        (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("fakelib", "fakelib_done", "fakelib_bad", "fakehook", "fakehook_done", "fakehook_bad"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import fakelib_done
    vlmo_fast._register_on_import("fakelib_done", "fakehook_done")   # already imported: now
    assert fakelib_done.VALUE == 2
    vlmo_fast._register_on_import("fakelib", "fakehook")
    vlmo_fast._register_on_import("fakelib_bad", "fakehook_bad")
    assert "fakehook" not in sys.modules
    import fakelib
    assert fakelib.VALUE == 42 and "fakehook" in sys.modules
    with pytest.warns(UserWarning, match="with fakelib_bad .RuntimeError: incompatible version"):
        import fakelib_bad
    assert fakelib_bad.VALUE == 2


def test_export_folder(exported):
    folder = exported / "relative"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "manifest.json", "README.md", "vocab.txt",
            "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            *REMOTE_CODE_FILES} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vlmo_fast" and config["architectures"] == ["VLMoFastModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_vlmo.VLMoFastModel"
    manifest = verify_manifest(folder)
    assert set(manifest["files"]) == names - {"manifest.json"}
    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf(make_model("relative"), folder)
    with pytest.raises(TypeError, match="vlmo_fast.VLMo"):
        export_hf(torch.nn.Linear(2, 2), exported / "x")


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_automodel_after_import_is_vlmo(exported, kind):
    model = make_model(kind)
    loaded = AutoModel.from_pretrained(exported / kind)
    assert isinstance(loaded, VLMoFastModel) and isinstance(loaded.vlmo, VLMo)
    assert not loaded.training and loaded.vlmo.config == model.config
    theirs, ours = loaded.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert loaded.cls_token is loaded.vlmo.cls_token   # one set of tensors behind both fronts
    images, ids, mask = make_inputs(model.config)
    want = reference_outputs(model, images, ids, mask)
    with torch.no_grad():
        image = loaded(pixel_values=images, return_vl=True)
        pair = loaded(pixel_values=images, input_ids=ids, attention_mask=mask)
        text = loaded.get_text_features(ids, mask)
    torch.testing.assert_close(image.image_embeds, want["image_embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(image.image_vl_embeds, want["image_vl_embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(text, want["text_embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(pair.itm_logits, want["itm_logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(pair.last_hidden_state, want["pair_hidden"], atol=1e-6, rtol=0)


def test_remote_code_loads_without_vlmo_fast(exported, tmp_path):
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    args, want = [], {}
    for kind in CONFIGS:
        # the reference backends are the numerics the plain-PyTorch code reproduces
        model = make_model(kind, ffn_backend="reference", attn_backend="reference")
        inputs = make_inputs(model.config)
        torch.save(inputs, tmp_path / f"{kind}-inputs.pt")
        args += [str(exported / kind), str(tmp_path / f"{kind}-inputs.pt"), str(tmp_path / f"{kind}.pt")]
        want[kind] = reference_outputs(model, *inputs)
    # one process for every folder (importing torch and transformers is most of its time)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for kind, expected in want.items():
        got = torch.load(tmp_path / f"{kind}.pt")
        for name, value in expected.items():
            if value is None:
                assert got[name] is None, f"{kind}: {name}"
            else:
                torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=f"{kind}: {name}")
        torch.testing.assert_close(got["features"], expected["image_embeds"], atol=1e-6, rtol=0)


def test_save_pretrained_round_trip_and_dtype(exported, tmp_path):
    loaded = AutoModel.from_pretrained(exported / "relative", device_map=None)
    loaded.save_pretrained(tmp_path / "again")
    assert {*REMOTE_CODE_FILES} <= {p.name for p in (tmp_path / "again").iterdir()}
    again = AutoModel.from_pretrained(tmp_path / "again", device_map=None)
    images, _, _ = make_inputs(loaded.vlmo.config)
    with torch.no_grad():
        assert torch.equal(again.get_image_features(images), loaded.get_image_features(images))
    # torch_dtype= (transformers 4) and dtype= (its name since 4.56)
    for dtype_arg, dtype in (("torch_dtype", torch.bfloat16), ("dtype", torch.float64)):
        low = AutoModel.from_pretrained(tmp_path / "again", **{dtype_arg: dtype})
        assert {p.dtype for p in low.parameters()} == {dtype}
        assert low.vlmo.patch_embed.proj.weight.dtype == dtype
        with torch.no_grad():
            got = low(pixel_values=images).image_embeds   # fp32 pixels are cast to the model's dtype
        torch.testing.assert_close(got.float(), loaded.get_image_features(images),
                                   atol=0.05 if dtype == torch.bfloat16 else 1e-6, rtol=0)


def test_tokenizer_gives_our_ids(exported, tokenizer):
    hf = AutoTokenizer.from_pretrained(exported / "relative")
    texts = ["A red circle LEFT of a blue square!", "two small cyan rings", "naïve café words",
             "a " * 40, ""]
    ids, mask = tokenizer.encode_batch(texts, max_len=16)
    batch = hf(texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)
    assert hf.model_max_length == 16
    # the tokenizer's output goes into the model as it is (token_type_ids included)
    model = AutoModel.from_pretrained(exported / "relative")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).text_embeds, model.get_text_features(ids, mask))
    with pytest.raises(ValueError, match="token_type_ids must be all 0"):
        model(input_ids=ids, token_type_ids=torch.ones_like(ids))
    # a plain tokenizer folder (WordPieceTokenizer.save) loads too
    tokenizer.save(exported / "tok_only")
    plain = AutoTokenizer.from_pretrained(exported / "tok_only")
    assert plain(texts[0]).input_ids == tokenizer.encode(texts[0])


def test_image_processor_is_the_eval_transform(exported, tmp_path):
    from PIL import Image

    from vlmo_fast.inference import load_image
    processor = AutoImageProcessor.from_pretrained(exported / "relative")
    rng = np.random.default_rng(0)
    for shape in [(64, 96, 3), (96, 64, 3), (32, 32, 3)]:   # sizes whose resize is exact in both
        path = tmp_path / "im.png"
        Image.fromarray((rng.random(shape) * 255).astype("uint8")).save(path)
        got = processor(Image.open(path), return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(got, load_image(path, 32), atol=2.01 / 255, rtol=0)


def test_damaged_export_is_caught(exported, tmp_path):
    import shutil
    folder = tmp_path / "copy"
    shutil.copytree(exported / "relative", folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        verify_manifest(folder)


def test_bad_inputs_are_named(exported):
    model = AutoModel.from_pretrained(exported / "relative")
    with pytest.raises(ValueError, match="pixel_values, input_ids, or both"):
        model()
    with pytest.raises(ValueError, match="front with VLMoFastModel.from_vlmo"):
        VLMoFastModel(hf_config_from_vlmo(VLMoConfig.preset("tiny")), vlmo=make_model("absolute"))


def test_cli_export_hf_loads_in_transformers_and_in_vlmo_fast(tokenizer, tmp_path):
    """`vlmo-fast export --hf`: AutoModel (after `import vlmo_fast`) and vlmo_fast's own loaders
    (VLMo / Encoder.from_pretrained, the timm tower) read the one folder, with equal outputs."""
    from vlmo_fast.cli import main
    from vlmo_fast.inference import Encoder
    model = make_model("ablations")   # per-modality attention: the tower must skip attn_text
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save(tmp_path / "ckpt")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "hf")]) == 0
    folder = tmp_path / "hf"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vlmo_fast"
    images, ids, mask = make_inputs(model.config)
    want = reference_outputs(model, images, ids, mask)
    auto = AutoModel.from_pretrained(folder)
    assert isinstance(auto, VLMoFastModel)
    ours = VLMo.from_pretrained(folder)
    assert ours.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(auto(pixel_values=images).image_embeds, want["image_embeds"], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.encode_image(images).features, want["image_embeds"], atol=0, rtol=0)
        torch.testing.assert_close(ours.itm_logits(ours.encode_pair(ids, images, mask)), want["itm_logits"],
                                   atol=0, rtol=0)
    encoder = Encoder.from_pretrained(folder, progress=False)
    reference = Encoder.from_pretrained(tmp_path / "ckpt", progress=False)
    torch.testing.assert_close(encoder.embed_texts(["a red circle"]), reference.embed_texts(["a red circle"]))
    timm = pytest.importorskip("timm")  # noqa: F841  (registers the tower names)
    from vlmo_fast.timm_models import vision_tower_from_pretrained
    tower = vision_tower_from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(tower(images), want["image_embeds"], atol=1e-6, rtol=0)
