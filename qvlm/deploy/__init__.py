"""Deployment, one job per module (read in order):

    layer        DeployedLinear: packed int4 / int8 codes + scales, run by the Triton kernels of `kernels`
    pack         deploy(model): every QuantLinear -> DeployedLinear, checking the packed weights equal the fake ones
    fuse         fuse_shared_inputs(model, forward): one GEMM for the linears that read one tensor (q|k|v, gate|up)
    checkpoint   save_packed / load_packed (the `qvlm deploy --out DIR` format)
    memory       bytes vs FP16: measured on a packed model, or by formula from a model's structure (ours and
                 compressed-tensors side by side)
    verify       kernel checks and layer-local packed-vs-fake checks
    export       export_compressed_tensors / load_export (`qvlm export --format compressed-tensors`)
    cli          `qvlm deploy`, `qvlm export`

Importing this package imports `kernels` (and triton): set TRITON_INTERPRET=1 first to run the kernels on a CPU.
"""
from .checkpoint import PACKED_META, load_packed, read_packed_meta, save_packed  # noqa: F401
from .layer import DeployedLinear, packed_linears, scheme  # noqa: F401
from .fuse import fuse_shared_inputs, is_fused  # noqa: F401
from .export import check_exportable, export_compressed_tensors, load_export  # noqa: F401
from .memory import formula_bytes, linear_bytes, memory_report, memory_table, reference_model  # noqa: F401
from .pack import backend, check_deployable, deploy, pack_layer  # noqa: F401
from .verify import integer_accumulator, kernel_checks, layer_rtol, layerwise_check, twin_check  # noqa: F401
