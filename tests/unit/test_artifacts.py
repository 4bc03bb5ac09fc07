"""qvlm.utils.save_artifact / load_artifact: typed, atomic artifact files with one-line errors."""
from dataclasses import dataclass

import pytest
import torch

from qvlm.errors import QVLMError
from qvlm.utils import load_artifact, save_artifact


@dataclass
class Thing:
    name: str
    values: torch.Tensor


def test_round_trip_and_no_temp_files(tmp_path):
    p = save_artifact("thing", Thing("a", torch.arange(3)), tmp_path / "sub" / "t.pt")
    got = load_artifact("thing", Thing, p, "save_thing")
    assert got.name == "a" and torch.equal(got.values, torch.arange(3))
    assert sorted(x.name for x in p.parent.iterdir()) == ["t.pt"]


@pytest.mark.parametrize("case", ["missing", "corrupt", "other_kind"])
def test_bad_files_raise_one_line(tmp_path, case):
    p = tmp_path / "t.pt"
    if case == "corrupt":
        p.write_bytes(b"not a torch file")
    elif case == "other_kind":
        save_artifact("other", Thing("a", torch.zeros(1)), p)
    with pytest.raises(QVLMError) as e:
        load_artifact("thing", Thing, p, "save_thing")
    assert "\n" not in str(e.value) and "save_thing" in str(e.value)


def test_failed_save_leaves_nothing(tmp_path):
    @dataclass
    class Holder:
        x: object

    with pytest.raises(Exception):
        save_artifact("thing", Holder(lambda: None), tmp_path / "t.pt")    # a lambda cannot be pickled
    assert list(tmp_path.iterdir()) == []
