"""Q-VLM, one module per step of the paper (read in this order):

    partition    entropy-guided block partition (Sec. 3.2 "cross-layer dependency mining", Fig. 3(a))
    disentangle  visual-encoder optimization, VEO (Sec. 3.3, Eq. 5)
    rounding     block-wise rounding search over a partition (Sec. 3.2)
    pipeline     the whole method: VEO -> profile -> partition -> rounding; search / save / load / apply

The registered method `qvlm` (qvlm.methods.qvlm) adapts `pipeline.run_qvlm` to the harness.
"""
