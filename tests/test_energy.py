import numpy as np
import pytest

from moebits.energy import ENERGY_SPECS, energy_matrix, get_energy_spec
from moebits.units import Choice


def test_energy_matrix_matches_a_hand_computation():
    choices = [Choice(b, 128) for b in (2, 4, 8, 16)]
    out_f, in_f, f, B = 256, 512, 0.25, 64
    e = energy_matrix([(out_f, in_f)], [f], choices, B, "horowitz45nm")
    spec = ENERGY_SPECS["horowitz45nm"]
    p = 1 - (1 - f) ** B
    m = f * B / p
    for j, c in enumerate(choices):
        bytes_ = c.storage_bits(out_f, in_f) / 8 + 2 * m * (in_f + out_f)
        want = p * (bytes_ * 160e-12 + 2 * m * in_f * out_f * 0.75e-12)
        assert e[0, j] == pytest.approx(want, rel=1e-12)
    assert spec.joules_per_byte == pytest.approx(160e-12) and np.all(np.diff(e[0]) > 0)


def test_energy_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown energy model"):
        get_energy_spec("tpu")
    with pytest.raises(ValueError, match="frequencies"):
        energy_matrix([(4, 4)], [1.5], [Choice(2, 4)], 8)
