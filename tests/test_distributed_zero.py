"""DeepSpeed ZeRO-3 on CPU: the LLaVA-HR-7B encoder built, loaded, saved and reloaded partitioned.

The release's ZeRO-3 fine-tuning failed with ConvNeXt size mismatches (``torch.Size([0])``): its
vision tower was built under ``deepspeed.zero.Init`` (parameters partitioned as each module is
made) and then loaded with a plain ``load_state_dict``. Here ``llava-hr-7b-1024`` (24 ViT layers,
patch 14, adapters after 6 / 12 / 18, ConvNeXt, 1024 px) is built at tiny widths under
``zero.Init`` in 2 processes over gloo (DeepSpeed's CPU accelerator), from local weights written
by transformers (``CLIPVisionModel.save_pretrained``) and timm (``convnext_large_mlp``'s own
state dict), saved gathered and reloaded partitioned.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4, patch_size=14,
           image_size=336, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CNN = dict(dims=[16, 32, 48, 64], depths=[1, 1, 1, 1])
WORKER = r'''
import json, sys, torch, deepspeed
# imported before zero.Init (which replaces torch.Tensor.__new__): torch._dynamo's polyfills,
# imported lazily by transformers' masking utilities, fail to import inside it
import torch._dynamo, timm, transformers.masking_utils, transformers.models.clip.modeling_clip
from transformers.integrations import HfDeepSpeedConfig
import mixres
from mixres.integrations.llava.distributed import save_partitioned
from mixres.pathways import gathered

vit_dir, cnn_file, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2, "zero_optimization": {"stage": 3}}
keep = HfDeepSpeedConfig(config)  # as Trainer does: transformers' from_pretrained then knows ZeRO-3

def build(pretrained):
    with deepspeed.zero.Init(config_dict_or_path=config):
        return mixres.create_encoder("llava-hr-7b-1024", pretrained=pretrained, **overrides)

def whole(encoder):
    with gathered(encoder, modifier_rank=None):
        return {n: p.detach().clone() for n, p in encoder.named_parameters()}

report = {}
encoder = build({"token_pathway": vit_dir, "map_pathway": cnn_file})
params = list(encoder.parameters())
report["partitioned"] = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
report["local_fraction"] = sum(p.ds_tensor.numel() for p in params) / sum(p.ds_numel for p in params)
loaded = whole(encoder)
try:  # the release's way: a plain load_state_dict into the partitioned parameters
    encoder.load_state_dict(loaded)
    report["plain_load"] = "loaded"
except RuntimeError as err:
    report["plain_load"] = str(err)[:2000]
dst = save_partitioned(f"{out}/converted", encoder)
torch.distributed.barrier()
again = whole(build(f"{out}/converted"))
report["reload_equal"] = loaded.keys() == again.keys() and all(torch.equal(loaded[k], again[k]) for k in loaded)
report["adapters"] = sorted({n.split(".")[1] for n in loaded if n.startswith("adapters.")})
if rank == 0:
    torch.save(loaded, f"{out}/loaded.pt")
    json.dump(report, open(f"{out}/report.json", "w"))
'''


@pytest.mark.slow
def test_llava_hr_7b_encoder_builds_loads_saves_and_reloads_under_zero3_init(tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VIT)).save_pretrained(tmp_path / "vit")  # transformers' own layout
    cnn = timm.create_model("convnext_large_mlp", pretrained=False, **CNN)  # timm's own keys
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(tmp_path / "convnext.safetensors"))
    overrides = {"token_pathway": {"kind": "pathway", "name": "hf_clip", "config": VIT, "drop_prefix": True, "select_layer": -1},
                 "map_pathway": {"kind": "pathway", "name": "timm_map", "model_name": "convnext_large_mlp", "model_kwargs": CNN}}
    (tmp_path / "worker.py").write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "worker.py"),
           str(tmp_path / "vit"), str(tmp_path / "convnext.safetensors"), str(tmp_path), json.dumps(overrides)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["partitioned"]  # every parameter holds only its shard (data is torch.Size([0]))
    assert 0.45 < report["local_fraction"] < 0.6  # each of 2 processes keeps about half (padded partitions)
    assert "torch.Size([0])" in report["plain_load"]  # the release's failure, reproduced on the same encoder
    assert report["reload_equal"] and report["adapters"] == ["0", "1", "2"]
    loaded = torch.load(tmp_path / "loaded.pt")
    vit = CLIPVisionModel.from_pretrained(tmp_path / "vit").state_dict()
    matched = 0
    for key, value in vit.items():  # the local weights arrived whole (copies: exact), not the random init
        ours = f"token_pathway.model.{key.removeprefix('vision_model.')}"
        if ours in loaded:
            torch.testing.assert_close(loaded[ours], value, rtol=0, atol=0, msg=key)
            matched += 1
    assert matched >= 24 * 16  # every layer's weights (16 tensors a CLIP layer)
    stem = [k for k in loaded if k.startswith("map_pathway.") and k.endswith("stem.0.weight")]
    assert len(stem) == 1
    torch.testing.assert_close(loaded[stem[0]], cnn.state_dict()["stem.0.weight"], rtol=0, atol=0)
