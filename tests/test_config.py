"""VLMoConfig: every field type-checked with the field named (bool is bool, int is int and not
bool, float accepts an int), ranges, JSON files, presets."""
import dataclasses
import json
import math

import numpy as np
import pytest

from vlmo_fast import VLMo, VLMoConfig

INT_FIELDS = ["dim", "depth", "num_heads", "vl_layers", "img_size", "patch_size", "in_chans",
              "vocab_size", "max_text_len", "type_vocab_size", "text_relpos_len", "num_classes"]
FLOAT_FIELDS = ["mlp_ratio", "drop_path_rate", "layer_norm_eps", "text_layer_norm_eps", "init_std",
                "layer_scale_init"]
BOOL_FIELDS = ["relative_position", "qkv_bias", "itc_vl_head", "vl_expert"]
STR_FIELDS = ["name", "attention"]


def test_the_tables_cover_every_field():
    assert set(INT_FIELDS + FLOAT_FIELDS + BOOL_FIELDS + STR_FIELDS) == {f.name for f in dataclasses.fields(VLMoConfig)}


BAD_TYPES = (
    [(f, v, "must be an int") for f in INT_FIELDS for v in (1.5, 2.0, "4", True, None, [4])]
    + [(f, v, "must be a float") for f in FLOAT_FIELDS for v in ("1e-6", True, [0.1])]
    + [(f, None, "must be a float") for f in FLOAT_FIELDS if f != "layer_scale_init"]
    + [(f, v, "must be a bool") for f in BOOL_FIELDS for v in ("false", "true", 0, 1, None, 1.0)]
    + [(f, v, "must be a str") for f in STR_FIELDS for v in (None, 3, b"tiny")]
)


@pytest.mark.parametrize("field,value,message", BAD_TYPES, ids=[f"{f}={v!r}" for f, v, _ in BAD_TYPES])
def test_wrong_types_raise_naming_the_field(field, value, message):
    with pytest.raises(TypeError, match=rf"VLMoConfig\.{field} {message}"):
        VLMoConfig.preset("tiny", **{field: value})
    data = {**VLMoConfig.preset("tiny").to_dict(), field: value}
    if isinstance(value, bytes):
        return  # not JSON
    with pytest.raises(TypeError, match=rf"config JSON: VLMoConfig\.{field} {message}"):
        VLMoConfig.from_json(json.dumps(data))


BAD_VALUES = [
    ("dim", 0, "dim must be a positive int"), ("depth", -1, "depth must be a positive int"),
    ("num_heads", 5, "divisible by num_heads"), ("mlp_ratio", 0, "mlp_ratio must be a finite number > 0"),
    ("mlp_ratio", -1.0, "mlp_ratio must be"), ("mlp_ratio", math.inf, "mlp_ratio must be"),
    ("mlp_ratio", 0.001, "FFN hidden size"), ("vl_layers", 5, "vl_layers must be in"),
    ("vl_layers", -1, "vl_layers must be in"), ("img_size", 40, "divisible by patch_size"),
    ("drop_path_rate", 1.0, "drop_path_rate must be in"), ("drop_path_rate", -0.1, "drop_path_rate"),
    ("drop_path_rate", math.nan, "drop_path_rate"),
    ("layer_norm_eps", 0, "layer_norm_eps must be a finite number > 0"),
    ("layer_norm_eps", math.nan, "layer_norm_eps must be"), ("text_layer_norm_eps", -1e-12, "text_layer_norm_eps"),
    ("init_std", 0.0, "init_std"), ("layer_scale_init", math.inf, "layer_scale_init must be finite"),
    ("num_classes", -1, "num_classes must be >= 0"), ("max_text_len", 64, "exceeds text_relpos_len"),
    ("text_relpos_len", 0, "text_relpos_len must be a positive int"), ("name", "", "name must be a non-empty"),
    ("attention", "separate", "attention must be one of"),
]


@pytest.mark.parametrize("field,value,message", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_out_of_range_values_raise_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        VLMoConfig.preset("tiny", **{field: value})


def test_accepted_spellings_are_normalised():
    c = VLMoConfig.preset("tiny", mlp_ratio=4, drop_path_rate=0, layer_scale_init=1, depth=np.int64(4),
                          num_classes=np.int32(3))
    assert type(c.mlp_ratio) is float and type(c.drop_path_rate) is float and type(c.layer_scale_init) is float
    assert type(c.depth) is int and type(c.num_classes) is int
    assert VLMoConfig.from_json(c.to_json()) == c
    assert VLMoConfig.preset("tiny", layer_scale_init=None).layer_scale_init is None


def test_preset_name_and_overrides():
    assert VLMoConfig.preset("tiny").name == "tiny"
    c = VLMoConfig.preset("tiny", name="my-tiny", depth=2, vl_layers=1)
    assert (c.name, c.depth, c.dim) == ("my-tiny", 2, 64)
    with pytest.raises(TypeError, match=r"unknown VLMoConfig field\(s\) \['dropout'\]"):
        VLMoConfig.preset("tiny", dropout=0.1)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        VLMoConfig.preset("huge")
    with pytest.raises(TypeError, match=r"VLMoConfig.replace: unknown VLMoConfig field\(s\) \['heads'\]"):
        c.replace(heads=2)
    with pytest.raises(TypeError, match="VLMoConfig.depth must be an int"):
        c.replace(depth="2")


def test_a_config_changed_after_construction_is_checked_when_a_model_is_built():
    c = VLMoConfig.preset("tiny")
    c.relative_position = "false"
    with pytest.raises(TypeError, match="VLMoConfig.relative_position must be a bool"):
        VLMo(c)


def test_json_files(tmp_path):
    c = VLMoConfig.preset("tiny", num_classes=3)
    path = tmp_path / "config.json"
    c.to_json(path)
    assert VLMoConfig.from_json(path) == c and VLMoConfig.from_json(str(path)) == c
    odd = tmp_path / "{exp}"  # a path that starts like JSON is read as a path
    c.to_json(odd)
    assert VLMoConfig.from_json(str(odd)) == c
    data = c.to_dict()
    data["layer_norm_eps"] = "1e-6"
    path.write_text(json.dumps(data))
    with pytest.raises(TypeError, match=rf"{path}: VLMoConfig.layer_norm_eps must be a float"):
        VLMoConfig.from_json(path)
    path.write_text('{"dim": 64,')
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON"):
        VLMoConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path}: expected a JSON object"):
        VLMoConfig.from_json(path)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=rf"{path}: not UTF-8"):
        VLMoConfig.from_json(path)
    with pytest.raises(FileNotFoundError):
        VLMoConfig.from_json(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="from_dict expects a dict"):
        VLMoConfig.from_dict([("dim", 64)])
