"""Weight sites: the values each weight quantizer rounds, including QKR's value rows and W_q^T W_k product."""
import pytest
import torch
import torch.nn as nn

import qvit
from qvit.models import iter_weight_sites
from qvit.nn import WeightSite
from qvit.nn.qkr import qk_product

from tests.helpers import statsq_test_vit


def _vit(qkr: bool) -> nn.Module:
    return statsq_test_vit(w_bits=3, a_bits=3, qkr=qkr)


def test_plain_sites_are_the_layers_weights():
    model = _vit(qkr=False)
    sites = list(iter_weight_sites(model))
    weight_sites = [s for s, _, q in qvit.iter_quantizers(model) if q.for_weights]
    assert [s.site for s in sites] == weight_sites
    for s in sites:
        assert s.frozen_in_place and s.value() is s.parameter
        assert s.parameter is s.layer.weight and s.layer is model.get_submodule(s.layer_name)
        assert torch.equal(s.codes(), s.quantizer.quantize(s.parameter.detach()))


def test_qkr_sites_are_the_value_rows_and_the_query_key_product():
    model = _vit(qkr=True)
    sites = {s.site: s for s in iter_weight_sites(model)}
    attn = model.blocks[0].attn
    hd = attn.num_heads * attn.head_dim
    qkv = sites["blocks.0.attn.qkv.weight"]
    assert qkv.layer is attn.qkv and qkv.rows == slice(2 * hd, 3 * hd) and not qkv.frozen_in_place
    assert torch.equal(qkv.value(), attn.qkv.weight[2 * hd:])
    assert torch.equal(qkv.codes(), attn.qkv.weight_quantizer.quantize(attn.qkv.weight.detach())[2 * hd:])
    prod = sites["blocks.0.attn.qk_weight"]
    assert prod.parameter is None and prod.layer_name == "blocks.0.attn.qkv" and not prod.frozen_in_place
    expected = torch.einsum("hdc,hde->hce", attn.qkv.weight[:hd].reshape(attn.num_heads, attn.head_dim, -1),
                            attn.qkv.weight[hd:2 * hd].reshape(attn.num_heads, attn.head_dim, -1))
    torch.testing.assert_close(prod.value(), expected.reshape(-1, expected.shape[-1]))
    torch.testing.assert_close(qk_product(attn), prod.value())
    assert prod.value().requires_grad                      # gradients reach W_q and W_k through the product
    assert torch.equal(prod.codes(), attn.qk_weight_quantizer.quantize(prod.value().detach()))
    assert prod.grid_position().shape == prod.value().shape
    assert len(sites) == len({s for s, _, q in qvit.iter_quantizers(model) if q.for_weights}) + len(model.blocks)


def test_a_site_is_a_parameter_or_a_computed_tensor():
    lin = nn.Linear(2, 2)
    q = qvit.quantizers.create_quantizer({"kind": "uniform", "bits": 4})
    with pytest.raises(ValueError, match="either"):
        WeightSite("w", "lin", lin, q)
    with pytest.raises(ValueError, match="either"):
        WeightSite("w", "lin", lin, q, parameter=lin.weight, compute=lambda: lin.weight)
