import pytest
import torch

from conftest import ARCHS
from moebits.models import ARCHS as SUPPORTED, MoEAdapter, UnsupportedModelError, load_model, tiny_model
from moebits.models.loading import TINY_CONFIGS, ModelLoadError
from moebits.units import Unit


def _ids(n=40, seed=0):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_units_match_config(arch):
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    cfg = TINY_CONFIGS[arch]
    E = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    moe_layers = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
    shared = 1 if arch in ("qwen2_moe", "deepseek_v2", "deepseek_v3") else 0
    assert ad.num_experts == E and len(ad.moe_layers) == moe_layers and ad.num_shared_experts == shared
    assert len(ad.units()) == moe_layers * (E + shared) * 3
    inter = cfg.get("moe_intermediate_size", cfg.get("intermediate_size"))
    H = cfg["hidden_size"]
    l0 = ad.moe_layers[0]
    assert ad.shape(Unit(l0, 0, "gate")) == (inter, H)
    assert ad.shape(Unit(l0, 0, "up")) == (inter, H)
    assert ad.shape(Unit(l0, 0, "down")) == (H, inter)
    if shared:
        mlp = ad.shared_mlp(l0)
        assert ad.shape(Unit(l0, "shared", "down")) == tuple(mlp.down_proj.weight.shape)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["gate", "up", "down"])
def test_writing_a_unit_changes_exactly_that_expert(arch, kind):
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    layer, expert = ad.moe_layers[-1], 3
    x = torch.randn(16, ad.hidden)
    before = {e: ad.expert_forward(layer, e, x) for e in range(ad.num_experts)}
    router = {n: p.clone() for n, p in model.named_parameters() if "gate.weight" in n and "experts" not in n}
    u = Unit(layer, expert, kind)
    others = {k: ad.weight(Unit(layer, expert, k)).clone() for k in ("gate", "up", "down") if k != kind}
    ad.set_weight(u, ad.weight(u) * 0.5 + 0.01)
    for k, w in others.items():
        assert torch.equal(ad.weight(Unit(layer, expert, k)), w), f"{k} of the same expert changed"

    for e in range(ad.num_experts):
        changed = not torch.allclose(ad.expert_forward(layer, e, x), before[e])
        assert changed == (e == expert), f"expert {e} changed={changed} after writing {u.name}"
    for n, p in model.named_parameters():
        if n in router:
            assert torch.equal(p, router[n]), f"router {n} was modified"
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_forward_matches_the_model_and_hooks_see_routing(arch):
    """Recompute each MoE layer's routed output from the hook's routing and `expert_forward`."""
    model = tiny_model(arch)
    ad = MoEAdapter(model)
    seen = []
    outs = {}
    hooks = [ad.experts(l).register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o)) for l in ad.moe_layers]
    with ad.capture_routing(seen.append), torch.no_grad():
        model(input_ids=_ids())
    for h in hooks:
        h.remove()
    assert [b.layer for b in seen] == ad.moe_layers
    for b in seen:
        assert b.top_k_index.shape == (80, ad.top_k)
        y = torch.zeros_like(b.hidden)
        for t in range(b.hidden.shape[0]):
            for j in range(ad.top_k):
                e = int(b.top_k_index[t, j])
                y[t] += b.top_k_weights[t, j] * ad.expert_forward(b.layer, e, b.hidden[t:t + 1])[0]
        assert torch.allclose(y, outs[b.layer], atol=1e-5)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    with pytest.raises(UnsupportedModelError) as e:
        MoEAdapter(AutoModelForCausalLM.from_config(cfg))
    for name in SUPPORTED:
        assert name in str(e.value)


def test_load_model_errors_and_local_dir_roundtrip(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    model, tok, ad = load_model("tiny:mixtral")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, tok2, ad2 = load_model(str(tmp_path / "m"))
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, m2(input_ids=ids).logits, atol=1e-5)
    assert len(ad2.units()) == len(ad.units())


def test_nan_weights_are_refused():
    model = tiny_model("olmoe")
    ad = MoEAdapter(model)
    ad.weight(Unit(1, 2, "down"))[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ad.check_finite()
