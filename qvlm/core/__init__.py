"""The quantization core every method and every analysis runs on (imports only `qvlm.models`, `qvlm.data` and
the top-level helpers; nothing here knows about Q-VLM's steps or any baseline):

    quant        quantize / dequantize / fake_quant pairs: the numerical reference for everything else
    hadamard     Hadamard matrices (Kronecker of Sylvester and Paley) and the fast Walsh-Hadamard transform
    qlinear      QuantLinear (fake-quantized nn.Linear) and swapping it into a model
    checkpoint   save_quantized / load_quantized (the `qvlm quantize --out DIR` format)
    hooks        calibration batches, forward taps, token masks
    units        linears that read one input tensor (q|k|v, gate|up): found by tracing
    calib        the block-by-block sequential calibration driver (BlockData)
    reconstruct  learned rounding + activation steps by output reconstruction (AdaRound / BRECQ machinery)
    cost         search cost: seconds, layer passes, peak memory
"""
