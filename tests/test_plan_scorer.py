import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moebits.apply import apply_plan
from moebits.data import held_out_windows, window_starts
from moebits.models import load_model
from moebits.plan import Plan
from moebits.plan_scorer import ORIGINAL, MeasuredLoss
from moebits.units import Choice


@torch.no_grad()
def _nll(model, windows):
    logits = model(input_ids=windows, use_cache=False).logits.double()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1)).item()


def test_measured_loss_is_the_quantized_models_nll_and_restores_the_weights():
    model, _, ad = load_model("tiny:qwen2_moe", "float32", seed=0)
    win = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0))
    choices = [Choice(2, 32, "rtn"), Choice(4, 32, "rtn")]
    before = {u: ad.weight(u).clone() for u in ad.units()}
    scorer = MeasuredLoss(ad, choices, win)
    U = len(ad.units())
    assert scorer(np.full(U, ORIGINAL)) == pytest.approx(_nll(model, win), rel=1e-6)
    mixed = np.arange(U) % 2  # alternate 2 and 4 bits
    got = scorer(mixed)
    assert all(torch.equal(ad.weight(u), before[u]) for u in ad.units())  # scoring leaves the model as it was
    ref_model, _, ref = load_model("tiny:qwen2_moe", "float32", seed=0)
    from moebits.plan import Assignment

    plan = Plan({u: Assignment(choices[int(j)]) for u, j in zip(ref.units(), mixed)})
    apply_plan(ref, plan, progress=False)
    assert got == pytest.approx(_nll(ref_model, win), rel=1e-5)
    assert scorer(mixed) == got and scorer.measurements == 2  # cached


def test_held_out_windows_share_no_token_with_the_calibration_windows():
    ids = torch.arange(5000)  # token id = position, so overlap is visible in the ids
    calib = set()
    for s in window_starts(ids.numel(), 8, 64, seed=3).tolist():
        calib.update(range(s, s + 64))
    held = held_out_windows(ids, 10, 64, calib_nsamples=8, seed=3)
    assert held.shape == (10, 64)
    assert not calib & set(held.reshape(-1).tolist())
    assert len(set(held.reshape(-1).tolist())) == 640  # the held-out windows do not overlap each other
