"""How the shipped testbeds were built (run once; their outputs ship under data/):

    train        `tiny`: a LLaVA-architecture model trained from scratch on the synthetic set (~35 min, 2 cores)
    sensitivity  does a testbed discriminate quantizers? naive RTN W4A4 / W8A8, recorded beside the checkpoint
    outliers     the FP-preserving outlier-channel reparameterisation (a teaching example: folding undoes it)
"""
