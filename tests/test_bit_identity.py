"""Refactors must not change numbers: every mode's fixed-seed WRN-10-1 run (element and block, 1 and 3
stacked trials) hashes to what tests/fixtures/bit_identity.json recorded (see tests/bit_identity.py)."""

import json

import pytest

from bit_identity import FIXTURE, environment, record


def test_every_mode_is_bit_identical_to_the_recorded_run(tmp_path, tiny_cifar):
    recorded = json.loads(FIXTURE.read_text())
    if recorded["environment"] != environment():
        pytest.skip(f"the fixture was recorded with {recorded['environment']}, this is {environment()}: "
                    "regenerate it at the reference commit (python tests/bit_identity.py)")
    runs = record(tiny_cifar, tmp_path)
    assert runs.keys() == recorded["runs"].keys()
    differ = {case: sorted(key for trial, hashes in trials.items() for key in hashes
                           if hashes[key] != recorded["runs"][case].get(trial, {}).get(key))
              for case, trials in runs.items()}
    assert not {c: d for c, d in differ.items() if d}, "runs whose numbers changed (case: hashes that differ)"
