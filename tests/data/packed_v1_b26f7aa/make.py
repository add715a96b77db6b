"""Writes a format-1 packed checkpoint with moebits before issue 25's zero storage (run with PYTHONPATH set
to that version's src): model/, expected.safetensors (token ids + logits of the in-memory quantized model,
torch on 1 thread) and expected_weights.json (sha256 of the in-memory model's dense expert weights)."""
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moebits.apply import apply_plan
from moebits.models import MoEAdapter, tiny_model
from moebits.models.loading import byte_tokenizer
from moebits.packed import save_packed
from moebits.plan import Assignment, Plan
from moebits.units import Choice

torch.set_num_threads(1)  # one reduction order, whatever the machine's core count
out = Path(sys.argv[1])
model = tiny_model("qwen2_moe")
ad = MoEAdapter(model)
mixed = [Choice(3, 32, "rtn"), Choice(4, 32, "hqq"), Choice(16), Choice(8, 0, "rtn"), Choice(5, 24, "rtn"),
         Choice(2, 16, "rtn"), Choice(3, 32, "hqq")]
plan = Plan({u: Assignment(mixed[i % len(mixed)]) for i, u in enumerate(ad.units())})
codes = {}
apply_plan(ad, plan, progress=False, codes=codes)
ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(ids).logits
save_packed(model, ad, plan, codes, out / "model", byte_tokenizer())
save_file({"ids": ids, "logits": logits.contiguous()}, str(out / "expected.safetensors"))
digest = lambda t: hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()  # noqa: E731
weights = {}
for layer in ad.moe_layers:
    ex = ad.experts(layer)
    weights[f"{layer}.gate_up"], weights[f"{layer}.down"] = digest(ex.gate_up_proj), digest(ex.down_proj)
    shared = ad.shared_mlp(layer)
    for k in ("gate", "up", "down"):
        weights[f"{layer}.shared.{k}"] = digest(getattr(shared, f"{k}_proj").weight)
(out / "expected_weights.json").write_text(json.dumps(weights, indent=1) + "\n")
