"""qvlm.models.llava.linear_layers lists each block's linears in EXECUTION order (traced with forward pre-hooks) for
the tiny testbed (CLIP + LLaMA), a random LLaVA with a DINOv2 tower (transformers 5 names), and a DINOv2-style block
with the transformers 4.x names (attention.attention.query/key/value, attention.output.dense, mlp.fc1/fc2)."""
import torch
from torch import nn

from random_llava import dinov2_llava

from qvlm import data, models
from qvlm.models import llava


def _traced(model, inputs) -> list[str]:
    infos = llava.linear_layers(model)
    order, handles = [], []
    for i in infos:
        handles.append(i.module.register_forward_pre_hook(
            lambda mod, a, k=i.key: order.append(k) if k not in order else None))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return order


def test_tiny_order_is_execution_order():
    model, processor = models.load("tiny")
    b = data.collate(data.load_split("tiny", "val", limit=2), processor)
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert [i.key for i in llava.linear_layers(model)] == _traced(model, inputs)


def test_dinov2_llava_order_is_execution_order():
    model, inputs = dinov2_llava()
    infos = llava.linear_layers(model)
    assert [i.short for i in infos if i.part == "vision"][:6] == ["attention.q_proj", "attention.k_proj",
                                                                 "attention.v_proj", "attention.o_proj",
                                                                 "mlp.fc1", "mlp.fc2"]
    assert [i.key for i in infos] == _traced(model, inputs)


class _Old(nn.Module):
    """A DINOv2 layer as transformers 4.x names it; built MLP first, so construction order is wrong too."""

    def __init__(self, d=8):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.attention = nn.Module()
        self.attention.attention = nn.Module()
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        for n in ("value", "key", "query"):
            setattr(self.attention.attention, n, nn.Linear(d, d))

    def forward(self, x):
        a = self.attention.attention
        att = torch.softmax(a.query(x) @ a.key(x).transpose(-1, -2), -1) @ a.value(x)
        x = x + self.attention.output.dense(att)
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


def test_transformers4_dinov2_names_are_ranked_in_execution_order():
    block = _Old()
    lins = [m for m in block.modules() if isinstance(m, nn.Linear)]
    rank = llava._forward_order(block, lins)
    names = {id(m): n for n, m in block.named_modules()}
    ranked = [names[id(m)] for m in sorted(lins, key=lambda m: rank[id(m)])]
    order = []
    hs = [m.register_forward_pre_hook(lambda mod, a, n=names[id(m)]: order.append(n)) for m in lins]
    block(torch.randn(1, 3, 8))
    for h in hs:
        h.remove()
    assert ranked[:3] == ["attention.attention.query", "attention.attention.key", "attention.attention.value"]
    assert ranked[3:] == order[3:]                     # dense, fc1, fc2 (q/k/v read one input: any order among them)
