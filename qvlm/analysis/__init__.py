"""The paper's measurements (Sec. 3.2), read-only on a model: nothing here quantizes weights.

    entropy      H(x_q) of every quantized linear's input over quantization levels
    dependency   Eq. 4 conditional entropy D(k, {k+1}), DED (layer-wise vs joint rounding search), R^2 fits
    outliers     per-channel activation statistics: outlier channels, massive-activation tokens, image vs text
"""
