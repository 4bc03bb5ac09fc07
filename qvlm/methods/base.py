"""`Method`: what every quantization method registers -- its knobs (a config dataclass) and how it runs.

A method is either a per-unit function called by the sequential calibration driver (`qvlm.core.calib.calibrate`)
on each unit (one transformer layer by default, or consecutive layers a method groups through `units`), or a full
`run` override for methods that need several passes (Q-VLM: visual-encoder optimization, profile, partition, search).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import QVLMError


@dataclass(frozen=True)
class Method:
    name: str
    config: type                                  # dataclass of the method's knobs (documented defaults)
    quantize_unit: Callable | None                # (data: BlockData, qcfg, cfg) -> stats dict; None = weights RTN only
    needs_data: bool                              # calibration data needed even with dynamic activations
    summary: str
    units: Callable | None = None                 # optional (model, qcfg, cfg) -> [[block key, ...], ...]
    # optional full override: run(model, processor, samples, qcfg, calib_cfg, cfg, progress, dataset=) -> stats
    run: Callable | None = None
    # optional: scalars for a result row from the method's stats (e.g. Q-VLM's number of blocks)
    row_fields: Callable | None = None
    transform: str = "none"                       # the equivalence transform the method implies (quarot: rotate)
    group: str = "unit"                           # what one optimisation group is: the unit's linears jointly | "linear"

    def knob_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]

    def make_config(self, **knobs) -> Any:
        """The method's config with `knobs` overriding the defaults (an unknown knob -> QVLMError)."""
        names = set(self.knob_names())
        bad = sorted(set(knobs) - names)
        if bad:
            raise QVLMError(f"method {self.name!r} has no option {bad[0]!r}",
                            f"its options are: {', '.join(sorted(names)) or '(none)'}")
        return self.config(**knobs)

    def knob_help(self) -> dict[str, str]:
        """{knob: the trailing `# comment` of its field}, from the config dataclass source (where each knob is
        documented once), including the fields it inherits."""
        out = {}
        for cls in reversed(self.config.__mro__):
            if not dataclasses.is_dataclass(cls):
                continue
            for line in inspect.getsource(cls).splitlines():
                m = re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line)
                if m:
                    out[m.group(1)] = m.group(2).strip()
        return out
