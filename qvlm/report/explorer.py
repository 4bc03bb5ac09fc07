"""The block-partition explorer of notebook 03: sliders for the profile's bit-width, p and the maximum depth redraw
the entropy profile and the partition it induces (qvlm.method.partition, no search). Under papermill (no widgets)
it draws one static figure at the given settings.
"""
from __future__ import annotations

import ipywidgets
import matplotlib.pyplot as plt
from IPython.display import display

from ..method import partition
from . import plots


def partition_figure(profile: dict, p: float, max_depth: int, title: str = ""):
    """The profile (qvlm.method.pipeline.run_profile output) as bars coloured by the blocks its Q-VLM partition
    gives at (p, max_depth), with the merge threshold."""
    blocks = partition.entropy_partition(profile["edge_scores"], p, max_depth, cuts=partition.part_cuts(profile["parts"]))
    thr = partition.threshold_value(profile["edge_scores"], p)
    names = [u[0] if len(u) == 1 else "+".join(k.rsplit(".", 1)[-1] for k in u) for u in profile["units"]]
    return plots.partition_profile(names, profile["entropy"], blocks, profile["parts"], thr,
                                   title=title or f"{profile['bits']}-bit profile, p={p:.2f}, max depth {max_depth}: "
                                                  f"{len(blocks)} blocks")


def explore(profiles: dict[int, dict], bits: int, p: float, max_depth: int, interactive: bool = False):
    """The static figure at (bits, p, max_depth); with `interactive`, also live sliders (the static figure is then
    only returned for saving, not shown twice)."""
    fig = partition_figure(profiles[bits], p, max_depth)
    if interactive:
        plt.close(fig)

        def redraw(bits, p, max_depth):
            partition_figure(profiles[bits], p, max_depth)
            plt.show()

        display(ipywidgets.interactive(redraw, bits=ipywidgets.SelectionSlider(options=sorted(profiles), value=bits),
                                       p=ipywidgets.FloatSlider(value=p, min=0.0, max=1.0, step=0.05),
                                       max_depth=ipywidgets.IntSlider(value=max_depth, min=1, max=8)))
    return fig
