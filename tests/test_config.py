"""QuantSpec / QuantConfig: defaults, derived facts, YAML round trips and one-line error messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qat.conf import CONFIG_DIR as PACKAGED_CONFIGS
from qat.config import (
    FORMATS,
    INT_FORMATS,
    SCALES_BY_KIND,
    QuantConfig,
    QuantConfigError,
    QuantSpec,
    format_bits,
    format_kind,
    quant_config_of,
)

CONFIG_DIR = Path(PACKAGED_CONFIGS) / "quant"


# ---------------------------------------------------------------- QuantSpec: derived facts
@pytest.mark.parametrize("bits", range(2, 9))
def test_int_grids(bits: int) -> None:
    s = QuantSpec(format=f"int{bits}")
    assert s.kind == "int" and s.signed and s.bits == bits
    assert s.qmin_qmax == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    u = QuantSpec(format=f"uint{bits}")
    assert u.kind == "int" and not u.signed and u.bits == bits
    assert u.qmin_qmax == (0, 2**bits - 1)


@pytest.mark.parametrize(
    ("fmt", "kind", "bits", "grid"),
    [("binary", "binary", 1.0, (-1, 1)), ("ternary", "ternary", 2.0, (-1, 1))],
)
def test_binary_ternary_facts(fmt: str, kind: str, bits: float, grid: tuple[int, int]) -> None:
    s = QuantSpec(format=fmt)
    assert (s.kind, s.bits, s.qmin_qmax) == (kind, bits, grid)


def test_fp8_facts() -> None:
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        assert format_kind(fmt) == "fp8" and format_bits(fmt) == 8.0
        assert QuantSpec(format=fmt).kind == "fp8"


def test_format_tables_are_consistent() -> None:
    assert len(INT_FORMATS) == 14 and set(INT_FORMATS) <= set(FORMATS)
    for fmt in FORMATS:
        assert format_kind(fmt) in SCALES_BY_KIND


@pytest.mark.parametrize(
    ("fmt", "default_scale"),
    [("int8", "minmax"), ("uint4", "minmax"), ("binary", "mean"), ("ternary", "twn"), ("fp8_e4m3", "minmax")],
)
def test_default_scale_per_family(fmt: str, default_scale: str) -> None:
    assert QuantSpec(format=fmt).scale == default_scale


def test_every_allowed_scale_builds() -> None:
    for fmt in FORMATS:
        for scale in SCALES_BY_KIND[format_kind(fmt)]:
            if scale == "pact" and not fmt.startswith("uint"):
                continue
            # engines' rules need their formats and granularities: tests/quant/test_engines.py
            if scale in ("gguf", "vllm", "compressed_tensors"):
                continue
            assert QuantSpec(format=fmt, scale=scale).scale == scale


def test_describe() -> None:
    assert QuantSpec(format="int4", granularity="per_group", group_size=32, scale="lsq").describe() == (
        "int4 per_group(32) lsq"
    )
    assert (
        QuantSpec(format="int8", granularity="per_token", dynamic=True).describe() == "int8 per_token dynamic"
    )
    assert QuantSpec(format="uint8", symmetric=False).describe() == "uint8 per_tensor minmax asym"


def test_spec_dict_round_trip() -> None:
    s = QuantSpec(format="int4", granularity="per_group", group_size=16, scale="lsq", symmetric=False)
    d = s.to_dict()
    assert "_key" not in d
    assert QuantSpec.from_dict(d) == s
    assert QuantSpec.from_dict(OmegaConf.create(d)) == s
    again = QuantSpec.from_dict(s, key="quant.weight")
    assert again == s and again is not s and again._key == "quant.weight"


# ---------------------------------------------------------------- QuantSpec: errors
SPEC_ERRORS = [
    # (kwargs, key named in the message, bad value, a piece of the allowed values)
    ({"format": "int9"}, "spec.format", "'int9'", "int2, int3"),
    ({"format": "float16"}, "spec.format", "'float16'", "fp8_e4m3, fp8_e5m2"),
    (
        {"scale": "twn"},
        "spec.scale",
        "'twn'",
        "minmax, ema, percentile, mse, lsq, pact, gguf, vllm, compressed_tensors (for format int8)",
    ),
    ({"format": "binary", "scale": "minmax"}, "spec.scale", "'minmax'", "mean, lsq"),
    ({"format": "ternary", "scale": "lsq"}, "spec.scale", "'lsq'", "twn, ttq, absmean"),
    (
        {"granularity": "per_row"},
        "spec.granularity",
        "'per_row'",
        "per_tensor, per_channel, per_group, per_token",
    ),
    ({"granularity": "per_group"}, "spec.group_size", "None", "a positive integer"),
    ({"granularity": "per_group", "group_size": 0}, "spec.group_size", "0", "a positive integer"),
    ({"granularity": "per_group", "group_size": True}, "spec.group_size", "True", "a positive integer"),
    ({"granularity": "per_group", "group_size": 4.0}, "spec.group_size", "4.0", "a positive integer"),
    (
        {"granularity": "per_channel", "group_size": 8},
        "spec.group_size",
        "8",
        "null unless granularity=per_group",
    ),
    ({"granularity": "per_token"}, "spec.granularity", "'per_token'", "dynamic=true"),
    ({"format": "binary", "dynamic": True}, "spec.dynamic", "True", "int and fp8"),
    ({"dynamic": True, "scale": "lsq"}, "spec.scale", "'lsq'", "minmax"),
    (
        {"format": "ternary", "granularity": "per_group", "group_size": 4},
        "spec.granularity",
        "'per_group'",
        "per_tensor, per_channel",
    ),
    ({"format": "int4", "scale": "pact"}, "spec.format", "'int4'", "uint2..uint8 with scale=pact"),
    (
        {"format": "uint4", "scale": "pact", "symmetric": False},
        "spec.symmetric",
        "False",
        "true with scale=pact",
    ),
    ({"percentile": 40.0}, "spec.percentile", "40.0", "(50, 100]"),
    ({"percentile": 100.5}, "spec.percentile", "100.5", "(50, 100]"),
    ({"ema_decay": 1.0}, "spec.ema_decay", "1.0", "[0, 1)"),
    ({"ema_decay": -0.1}, "spec.ema_decay", "-0.1", "[0, 1)"),
    ({"axis": "0"}, "spec.axis", "'0'", "an integer"),
]


@pytest.mark.parametrize(("kwargs", "key", "bad", "allowed"), SPEC_ERRORS)
def test_spec_errors_name_key_value_and_allowed(kwargs: dict, key: str, bad: str, allowed: str) -> None:
    with pytest.raises(QuantConfigError) as ei:
        QuantSpec(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(f"{key}: {bad} is not valid; allowed: "), msg
    assert allowed in msg
    assert "\n" not in msg


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(QuantConfigError, ValueError)


def test_spec_unknown_field_lists_known_fields() -> None:
    with pytest.raises(
        QuantConfigError, match=r"^quant\.weight\.bitz: unknown field; allowed: format, granularity"
    ):
        QuantSpec.from_dict({"format": "int4", "bitz": 4}, key="quant.weight")
    with pytest.raises(QuantConfigError, match="unknown field"):
        QuantSpec.from_dict({"_key": "x"})


def test_spec_from_non_mapping() -> None:
    with pytest.raises(QuantConfigError, match=r"^quant\.weight: 'int8' is not valid; allowed: a mapping"):
        QuantSpec.from_dict("int8", key="quant.weight")


def test_spec_key_prefixes_errors() -> None:
    with pytest.raises(QuantConfigError, match=r"^quant\.activation\.format: 'int1'"):
        QuantSpec.from_dict({"format": "int1"}, key="quant.activation")


# ---------------------------------------------------------------- QuantConfig
def test_config_defaults() -> None:
    cfg = QuantConfig()
    assert cfg.weight == QuantSpec(format="int8", granularity="per_channel")
    assert cfg.activation is None and cfg.attention is None
    assert cfg.include == ["*"] and cfg.exclude == [] and cfg.overrides == {}


def test_config_accepts_spec_dicts_and_glob_strings() -> None:
    cfg = QuantConfig(
        weight={"format": "int4", "scale": "lsq"},
        activation={"format": "uint8", "symmetric": False},
        include="blocks.*",
        exclude=("head",),
    )
    assert isinstance(cfg.weight, QuantSpec) and cfg.weight.format == "int4"
    assert cfg.weight._key == "quant.weight" and cfg.activation._key == "quant.activation"
    assert cfg.include == ["blocks.*"] and cfg.exclude == ["head"]


def test_config_dict_round_trip() -> None:
    cfg = QuantConfig(
        weight={"format": "int4", "granularity": "per_group", "group_size": 8, "scale": "lsq"},
        activation={"format": "int8", "granularity": "per_token", "dynamic": True, "symmetric": False},
        include=["*"],
        exclude=["head"],
        overrides={"embed": {"weight": {"format": "int8"}}, "fc": {"weight": None}},
        attention={"format": "int8", "dynamic": True},
    )
    d = cfg.to_dict()
    assert QuantConfig.from_dict(d) == cfg
    assert QuantConfig.from_dict(OmegaConf.create(d)) == cfg


def test_config_from_dict_and_dictconfig() -> None:
    d = {"name": "w4", "weight": {"format": "int4"}, "activation": None, "include": ["*"]}
    a = QuantConfig.from_dict(d)
    b = QuantConfig.from_dict(OmegaConf.create(d))
    assert a == b and a.weight.format == "int4"
    assert QuantConfig.from_dict(a) is a


def test_config_from_dict_resolves_interpolations() -> None:
    d = OmegaConf.create({"bits": "int4", "quant": {"weight": {"format": "${bits}"}}})
    assert QuantConfig.from_dict(d.quant).weight.format == "int4"


def test_config_from_dict_unknown_key() -> None:
    with pytest.raises(QuantConfigError) as ei:
        QuantConfig.from_dict({"weights": {"format": "int4"}})
    msg = str(ei.value)
    assert msg.startswith("quant.weights: unknown field; allowed: ")
    assert "weight, activation, include, exclude, overrides, attention" in msg


def test_config_from_non_mapping() -> None:
    with pytest.raises(QuantConfigError, match=r"^quant: \['int8'\] is not valid; allowed: a mapping"):
        QuantConfig.from_dict(["int8"])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_quant_configs_load(path: Path) -> None:
    cfg = QuantConfig.from_dict(OmegaConf.load(path))
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


def test_a_quant_node_without_weight_and_activation_is_a_float_run() -> None:
    assert quant_config_of(OmegaConf.load(CONFIG_DIR / "fp32.yaml")) is None
    assert quant_config_of({"weight": None, "activation": {"format": "int8"}}).weight is None
    assert quant_config_of(OmegaConf.load(CONFIG_DIR / "w4a4.yaml")).weight.format == "int4"


CONFIG_ERRORS = [
    ({"weight": {"format": "int8", "dynamic": True}}, "quant.weight.dynamic", "True", "false"),
    (
        {"weight": {"format": "int8", "granularity": "per_token", "dynamic": True}},
        "quant.weight.dynamic",
        "True",
        "false",
    ),
    (
        {"activation": {"format": "int8", "granularity": "per_group", "group_size": 8}},
        "quant.activation.granularity",
        "'per_group'",
        "per_tensor, per_channel (static)",
    ),
    ({"weight": {"format": "int3", "scale": "lsqq"}}, "quant.weight.scale", "'lsqq'", "lsq"),
    ({"attention": {"format": "int88"}}, "quant.attention.format", "'int88'", "int8"),
    ({"include": []}, "quant.include", "[]", "at least one glob"),
    ({"include": ["*", 3]}, "quant.include", "['*', 3]", "a glob string or a list of glob strings"),
    ({"exclude": 5}, "quant.exclude", "5", "a glob string or a list of glob strings"),
    ({"overrides": ["fc"]}, "quant.overrides", "['fc']", "a mapping {glob:"),
    (
        {"overrides": {"fc": "int8"}},
        "quant.overrides.fc",
        "'int8'",
        "a mapping with keys weight and/or activation",
    ),
    (
        {"overrides": {"fc": {"weight": "int8"}}},
        "quant.overrides.fc.weight",
        "'int8'",
        "a mapping of QuantSpec fields, or null",
    ),
    (
        {"overrides": {"head": {"weight": {"format": "int12"}}}},
        "quant.overrides.head.weight.format",
        "'int12'",
        "int2, int3",
    ),
    (
        {"overrides": {"head": {"weight": {"granularity": "per_group"}}}},
        "quant.overrides.head.weight.group_size",
        "None",
        "a positive integer",
    ),
    # Overrides obey the same side rules as the base specs (no dynamic weights, no static per-group inputs).
    (
        {"overrides": {"head": {"weight": {"dynamic": True}}}},
        "quant.overrides.head.weight.dynamic",
        "True",
        "false (weights have static scales)",
    ),
    (
        {
            "activation": {"format": "int8"},
            "overrides": {"head": {"activation": {"granularity": "per_group", "group_size": 4}}},
        },
        "quant.overrides.head.activation.granularity",
        "'per_group'",
        "per_tensor, per_channel (static)",
    ),
]


@pytest.mark.parametrize(("kwargs", "key", "bad", "allowed"), CONFIG_ERRORS)
def test_config_errors_name_key_value_and_allowed(kwargs: dict, key: str, bad: str, allowed: str) -> None:
    with pytest.raises(QuantConfigError) as ei:
        QuantConfig(**kwargs)
    msg = str(ei.value)
    assert msg.startswith(f"{key}: {bad} is not valid; allowed: "), msg
    assert allowed in msg
    assert "\n" not in msg


def test_override_unknown_side() -> None:
    with pytest.raises(QuantConfigError) as ei:
        QuantConfig(overrides={"head": {"weights": {"format": "int8"}}})
    assert str(ei.value) == "quant.overrides.head.weights: unknown field; allowed: weight, activation, smooth"


def test_override_unknown_spec_field() -> None:
    with pytest.raises(
        QuantConfigError, match=r"^quant\.overrides\.head\.weight\.bits: unknown field; allowed:"
    ):
        QuantConfig(overrides={"head": {"weight": {"bits": 8}}})


# ---------------------------------------------------------------- spec_for: merging overrides
def _cfg(**kw) -> QuantConfig:
    base = dict(
        weight={"format": "int4", "granularity": "per_group", "group_size": 8, "scale": "lsq"},
        activation={"format": "uint8", "symmetric": False, "scale": "ema"},
    )
    base.update(kw)
    return QuantConfig(**base)


def test_spec_for_without_side_returns_base() -> None:
    cfg = _cfg()
    assert cfg.spec_for("weight", {"activation": None}) is cfg.weight


def test_spec_for_null_keeps_float() -> None:
    cfg = _cfg()
    assert cfg.spec_for("weight", {"weight": None}) is None
    assert cfg.spec_for("activation", {"activation": None}) is None


def test_spec_for_merges_fields() -> None:
    cfg = _cfg()
    s = cfg.spec_for("weight", {"weight": {"format": "int8"}}, "head")
    assert s == dataclasses.replace(cfg.weight, format="int8")
    assert s._key == "quant.overrides.head.weight"


def test_spec_for_format_family_switch_drops_base_scale() -> None:
    cfg = _cfg()
    s = cfg.spec_for("weight", {"weight": {"format": "ternary", "granularity": "per_channel"}})
    assert s.format == "ternary" and s.scale == "twn" and s.group_size is None
    f = cfg.spec_for("activation", {"activation": {"format": "fp8_e4m3"}})
    assert f.scale == "minmax"  # another family: back to that family's default scale source
    b = cfg.spec_for("activation", {"activation": {"format": "binary"}})
    assert b.scale == "mean"


def test_spec_for_granularity_switch_drops_group_size() -> None:
    cfg = _cfg()
    s = cfg.spec_for("weight", {"weight": {"granularity": "per_channel"}})
    assert s.granularity == "per_channel" and s.group_size is None and s.scale == "lsq"


def test_spec_for_with_null_base_uses_defaults() -> None:
    cfg = QuantConfig(weight=None)
    s = cfg.spec_for("weight", {"weight": {"format": "int8"}})
    assert s == QuantSpec(format="int8")


def test_spec_for_accepts_spec_objects() -> None:
    cfg = _cfg()
    spec = QuantSpec(format="int2")
    assert cfg.spec_for("weight", {"weight": spec}) == spec
    with pytest.raises(QuantConfigError, match=r"^quant\.overrides\.fc\.weight\.dynamic: True"):
        cfg.spec_for("weight", {"weight": QuantSpec(format="int8", dynamic=True)}, "fc")


def test_overrides_mapping_is_copied_to_plain_dicts() -> None:
    cfg = QuantConfig(overrides=OmegaConf.to_container(OmegaConf.create({"fc": {"weight": None}})))
    assert cfg.overrides == {"fc": {"weight": None}}
    assert type(cfg.overrides["fc"]) is dict
