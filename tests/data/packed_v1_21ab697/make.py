"""Writes a format-1 packed checkpoint with the code of main before issue 25's zero storage."""
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
import moebits
print(moebits.__file__)
from moebits.apply import apply_plan
from moebits.models import MoEAdapter, tiny_model
from moebits.models.loading import byte_tokenizer
from moebits.packed import save_packed
from moebits.plan import Assignment, Plan
from moebits.units import Choice
out = Path(sys.argv[1])
model = tiny_model("qwen2_moe")
ad = MoEAdapter(model)
mixed = [Choice(3, 32, "rtn"), Choice(4, 32, "hqq"), Choice(16), Choice(8, 0, "rtn"), Choice(5, 24, "rtn"), Choice(2, 16, "rtn"), Choice(3, 32, "hqq")]
plan = Plan({u: Assignment(mixed[i % len(mixed)]) for i, u in enumerate(ad.units())})
codes = {}
apply_plan(ad, plan, progress=False, codes=codes)
ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(ids).logits
save_packed(model, ad, plan, codes, out / "model", byte_tokenizer())
save_file({"ids": ids, "logits": logits.contiguous()}, str(out / "expected.safetensors"))
