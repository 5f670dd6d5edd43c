import pytest

from conftest import FAMILIES, make_model
from steerwise.sites import SITE_KINDS, SiteError, parse_layers, resolve_sites


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_named_site_resolves_to_a_real_module(family):
    model = make_model(family)
    for kind in SITE_KINDS:
        sites = resolve_sites(model, kind)
        assert [s.layer for s in sites] == [0, 1, 2]
        for s in sites:
            model.get_submodule(s.module)  # raises if missing
        assert all(s.io == ("input" if kind == "heads" else "output") for s in sites)


def test_gemma2_attn_and_mlp_are_the_post_norms():
    sites = resolve_sites(make_model("gemma2"), "mlp", [1])
    assert sites[0].module == "model.layers.1.post_feedforward_layernorm"


def test_unknown_site_names_model_and_choices():
    with pytest.raises(SiteError, match=r"qwen2.*residual, attn, mlp, heads"):
        resolve_sites(make_model("qwen2"), "resid")


def test_layer_specs():
    assert parse_layers(None, 6) == list(range(6))
    assert parse_layers("all", 6) == list(range(6))
    assert parse_layers("1-3", 6) == [1, 2, 3]
    assert parse_layers("0,2,-1", 6) == [0, 2, 5]
    assert parse_layers([4, 1], 6) == [1, 4]
    with pytest.raises(SiteError, match="out of range"):
        parse_layers("7", 6)
    with pytest.raises(SiteError, match="cannot read"):
        parse_layers("x", 6)


def test_regex_sites():
    model = make_model("llama")
    sites = resolve_sites(model, r"re:model\.layers\.\d+\.self_attn:0")
    assert [s.layer for s in sites] == [0, 1, 2] and sites[0].tuple_index == 0
    sites = resolve_sites(model, r"re-in:model\.layers\.1\.mlp\.down_proj")
    assert sites[0].io == "input" and sites[0].layer == 1
    with pytest.raises(SiteError, match="matches no module"):
        resolve_sites(model, "re:nothing_here")
